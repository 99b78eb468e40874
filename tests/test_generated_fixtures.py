"""The data path on generated fixtures (tests/fixtures/synth.py): runs on every clone, no ../shared/data.

curate (exact + near dedup against planted ground truth, PII, language ID on several scripts) ->
preprocess (round trip, worker-count invariance) -> mixture (realized alpha) and the tokenizer extension
(old ids unchanged, held-out cut, round trip). The real-corpus versions of these tests (test_curate.py,
test_preprocess.py, test_mixture.py, test_tokenizer.py) run on top when ../shared/data exists.
"""

from __future__ import annotations

import filecmp
import gzip
import json
import socket

import pytest

from cpt_megatron.curate import curate, load_config
from tests.fixtures import synth


def _read_out(folder):
    out = []
    for p in sorted(folder.glob("shard-*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f)
    return out


@pytest.fixture(scope="module")
def planted():
    return synth.planted_corpus(seed=0)


@pytest.fixture(scope="module")
def curated(planted, tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_curate")
    src = synth.write_jsonl(d / "in.jsonl", planted["docs"])
    cfg = load_config(overrides={"stages": ["normalize", "exact_dedup", "minhash_dedup", "pii"]})
    return curate([src], d / "out", cfg), d / "out"


# ---------------------------------------------------------------- curation


def test_curate_removes_exactly_the_planted_copies(planted, curated):
    res, out = curated
    kept = {d["id"] for d in _read_out(out)}
    removed = {d["id"] for d in planted["docs"]} - kept
    assert res.read == len(planted["docs"]) and res.malformed == 0
    assert res.removed["exact_dedup"] == len(planted["exact"]) == 15  # exact copies: the exact stage
    assert removed == set(planted["exact"]) | set(planted["near"])  # precision 1.0, recall 1.0 (clear-cut)
    assert res.removed["minhash_dedup"] == len(planted["near"]) == 30
    assert set(planted["far"]) <= kept and sum(i.startswith("b") for i in kept) == 120  # no original lost
    assert res.kept + sum(res.removed.values()) + res.malformed == res.read


def test_curate_redacts_planted_pii(planted, curated):
    res, out = curated
    assert res.report["pii"] == planted["pii"]
    texts = "\n".join(d["text"] for d in _read_out(out))
    for kind in planted["pii"]:
        assert f"<{kind}>" in texts
    for raw in ("jane.roe+clinic@mail.example.org", "4539 1488 0343 6467", "2345 6789 0124", "10.0.12.254"):
        assert raw not in texts


def test_curate_workers_byte_identical(planted, tmp_path):
    src = synth.write_jsonl(tmp_path / "in.jsonl", planted["docs"])
    cfg = {"stages": ["normalize", "exact_dedup", "minhash_dedup", "pii"]}
    for w in (1, 2):
        curate([src], tmp_path / f"w{w}", load_config(overrides=cfg), workers=w)
    a, b = sorted((tmp_path / "w1").glob("shard-*")), sorted((tmp_path / "w2").glob("shard-*"))
    assert [p.name for p in a] == [p.name for p in b]
    assert [gzip.decompress(p.read_bytes()) for p in a] == [gzip.decompress(p.read_bytes()) for p in b]


def test_language_id_on_every_script(tmp_path):
    pytest.importorskip("pycld2", reason="language ID needs the indic extra")
    from cpt_megatron.curate.langid import identify

    for lang, lines in synth.MULTI_SCRIPT.items():
        for ln in lines:
            assert identify(ln).lang == lang, (lang, ln, identify(ln))
    docs = [{"id": f"{lang}{i}", "text": t} for lang, lines in synth.MULTI_SCRIPT.items() for i, t in enumerate(lines)]
    cfg = load_config(overrides={"stages": ["normalize", "langid"], "normalize": {"indic": True},
                                 "langid": {"keep": ["hi", "en"], "romanized_hindi": "route"}})
    res = curate([synth.write_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", cfg)
    kept = {d["id"] for d in _read_out(tmp_path / "out")}
    assert kept == {d["id"] for d in docs if d["id"].rstrip("0123456789") in ("hi", "en")}
    assert res.report["languages"] == {k: len(v) for k, v in synth.MULTI_SCRIPT.items()}
    assert res.report["routes"] == {"hi-Latn": len(synth.MULTI_SCRIPT["hi-Latn"])}
    assert res.removed["langid"] == sum(len(v) for k, v in synth.MULTI_SCRIPT.items() if k in ("mr", "bn", "ta"))


# ---------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def preprocessed(curated, gpt2_tokenizer_dir, tmp_path_factory):
    from cpt_megatron.data import preprocess as pp

    d = tmp_path_factory.mktemp("synth_pp")
    med = synth.write_jsonl(d / "med.jsonl", synth.medical_docs(300, seed=3) + synth.code_docs(20, seed=3))
    inputs = {"general": sorted(str(p) for p in curated[1].glob("shard-*.jsonl.gz")), "med": [str(med)]}
    out = {}
    for name, paths in inputs.items():
        s = pp.preprocess(pp.PreprocessConfig(inputs=paths, tokenizer=str(gpt2_tokenizer_dir), out=str(d / name),
                                              append_eod=True, progress=False, chunk_bytes=20_000, workers=1))
        out[name] = (str(d / name), paths, s)
    return out


def test_preprocess_round_trip_and_workers(preprocessed, gpt2_tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from cpt_megatron.data import preprocess as pp
    from cpt_megatron.tokenizer.load import load_tokenizer

    prefix, paths, summary = preprocessed["med"]
    docs = [json.loads(x)["text"] for x in open(paths[0], encoding="utf-8")]
    tok = load_tokenizer(gpt2_tokenizer_dir)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) == summary["outputs"]["text"]["documents"] == 320
    for i, text in enumerate(docs):
        ids = ds[i].tolist()
        assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], i
    pp.preprocess(pp.PreprocessConfig(inputs=paths, tokenizer=str(gpt2_tokenizer_dir), out=str(tmp_path / "w2"),
                                      append_eod=True, progress=False, chunk_bytes=20_000, workers=2))
    for ext in ("bin", "idx"):
        assert filecmp.cmp(f"{prefix}.{ext}", tmp_path / f"w2.{ext}", shallow=False), ext


# ---------------------------------------------------------------- mixtures


@pytest.fixture(scope="module")
def gloo():
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_mixture_realizes_alpha_on_generated_sources(preprocessed, tmp_path, gloo):
    from cpt_megatron.data.mixture import MixtureConfig, SourceConfig, build_mixture

    cfg = MixtureConfig(alpha=0.7, sources=[SourceConfig(name="med", prefix=preprocessed["med"][0], group="domain"),
                                            SourceConfig(name="general", prefix=preprocessed["general"][0],
                                                         group="general")])
    mix = build_mixture(cfg, seq_len=64, train_samples=2000, valid_samples=4, cache_dir=str(tmp_path / "cache"),
                        tokenizer_vocab_size=50257, eod_id=50256)
    rep = mix.report()
    assert len(mix.train) == 2000 and rep["groups"]["domain"] == pytest.approx(0.7, abs=0.01)
    assert sum(s["tokens"] for s in rep["sources"].values()) == 2000 * 64
    assert set(mix.valid) == {"med", "general"}
    item = mix.train[17]
    assert item["tokens"].shape == (64,) and mix.source_names[item["source"]] in ("med", "general")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_extension_on_generated_medical_text(gpt2_tokenizer_dir, tmp_path):
    from cpt_megatron.tokenizer.extend import extend_tokenizer
    from cpt_megatron.tokenizer.load import load_tokenizer

    train = tmp_path / "train.txt"
    train.write_text("".join(synth.medical_docs(1500, seed=10)), encoding="utf-8")
    held = "".join(synth.medical_docs(200, seed=11))
    general = "".join(synth.general_docs(100, seed=12))
    extend_tokenizer(gpt2_tokenizer_dir, [train], 200, tmp_path / "tok")
    base, new = load_tokenizer(gpt2_tokenizer_dir), load_tokenizer(tmp_path / "tok", cache=False)
    assert len(new) == len(base) + 200
    nv = new.get_vocab()
    assert all(nv[t] == i for t, i in base.get_vocab().items())  # every old id keeps its string
    n_base, n_new = len(base.encode(held)), len(new.encode(held))
    assert 1 - n_new / n_base >= 0.4, (n_base, n_new)  # templated text: the phrases win (measured 50.1%)
    used = {i for i in new.encode(held) if i >= len(base)}
    words = [new.convert_ids_to_tokens(i) for i in used]
    assert len(used) > 100 and any(w.count("Ġ") >= 2 for w in words) and any("Ġ" not in w for w in words)
    assert len(new.encode(general)) == len(base.encode(general))  # general English: no new token fires
    samples = [held, general, *synth.code_docs(5), *(x for v in synth.MULTI_SCRIPT.values() for x in v),
               "tab\there  two spaces, emoji 🦙 and ① ﬁ"]
    for text in samples:
        assert new.decode(new.encode(text)) == text
