"""`cpt preprocess`: round trip, worker-count invariance, resumability, bad input, multi-key."""

from __future__ import annotations

import filecmp
import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from cpt_megatron.cli import main
from cpt_megatron.data import preprocess as pp
from cpt_megatron.errors import CptError


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cpt_cache"))


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """~400 real documents: MedQuAD pages and WikiText-2 paragraphs, plus two empty docs."""
    d = tmp_path_factory.mktemp("corpus")
    text = (shared_data / "domain" / "medquad_qa.txt").read_text()[:1_500_000]
    docs = [x for x in re.split(r"(?m)^(?=# )", text) if x.strip()][:300]
    wiki = (shared_data / "general" / "wikitext2_raw_test.txt").read_text().split("\n")[:2000]
    docs += ["\n".join(wiki[i : i + 20]) for i in range(0, len(wiki), 20)]
    docs.insert(5, "")
    docs.insert(50, "")
    path = d / "c.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": i, "source": "test", "text": t}) + "\n")
    return path, docs


def _cfg(corpus_path, tok, out, **kw):
    kw.setdefault("append_eod", True)
    kw.setdefault("progress", False)
    return pp.PreprocessConfig(inputs=[str(corpus_path)], tokenizer=str(tok), out=str(out), **kw)


def test_round_trip_and_meta(corpus, gpt2_tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from cpt_megatron.tokenizer.load import load_tokenizer

    path, docs = corpus
    s = pp.preprocess(_cfg(path, gpt2_tokenizer_dir, tmp_path / "ds", chunk_bytes=200_000))
    out = s["outputs"]["text"]
    kept = [t for t in docs if t]
    assert out["documents"] == len(kept) and out["empty_docs_skipped"] == 2
    tok = load_tokenizer(gpt2_tokenizer_dir)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == len(kept)
    for i in range(0, len(kept), 7):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eos_token_id
        assert ids[:-1] == tok(kept[i], add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == kept[i] + "<|endoftext|>"
    meta = json.loads((tmp_path / "ds.meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == 50257 and meta["tokenizer"]["eod_id"] == 50256
    assert set(meta["tokenizer"]["sha256"]) == {"encoder.json", "vocab.bpe"}
    assert meta["dtype"] == "uint16" and meta["tokens"] == sum(len(ds[i]) for i in range(len(ds)))
    assert meta["sources"][0]["sha256"] and meta["empty_docs_skipped"] == 2
    assert not (tmp_path / "ds.shards").exists()


def test_same_bytes_any_workers_and_hf_encoder(corpus, gpt2_tokenizer_dir, tmp_path):
    path, _ = corpus
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    pp.preprocess(_cfg(path, gpt2_tokenizer_dir, tmp_path / "w1", workers=1, chunk_bytes=150_000))
    pp.preprocess(_cfg(gz, gpt2_tokenizer_dir, tmp_path / "w2", workers=2, chunk_bytes=150_000))
    pp.preprocess(_cfg(path, gpt2_tokenizer_dir, tmp_path / "hf", workers=2, chunk_bytes=400_000, fast=False))
    for other in ("w2", "hf"):
        for ext in ("bin", "idx"):
            assert filecmp.cmp(tmp_path / f"w1.{ext}", tmp_path / f"{other}.{ext}", shallow=False), (other, ext)


def test_resume_skips_finished_shards(corpus, gpt2_tokenizer_dir, tmp_path, monkeypatch):
    path, _ = corpus
    cfg = _cfg(path, gpt2_tokenizer_dir, tmp_path / "r", chunk_bytes=100_000)
    ref = _cfg(path, gpt2_tokenizer_dir, tmp_path / "ref", chunk_bytes=100_000)
    pp.preprocess(ref)
    real = pp._encode_shard
    calls = []

    def flaky(task):  # the "interruption": shard 3 fails
        calls.append(task[0])
        if task[0] == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(pp, "_encode_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(cfg)
    assert not (tmp_path / "r.bin").exists() and not (tmp_path / "r.idx").exists()
    assert not list(tmp_path.glob("r.bin*")) and not list(tmp_path.glob("r.idx*"))
    calls.clear()

    def counting(task):
        calls.append(task[0])
        return real(task)

    monkeypatch.setattr(pp, "_encode_shard", counting)
    s = pp.preprocess(cfg)
    assert s["shards_skipped"] == 3 and calls[0] == 3
    for ext in ("bin", "idx"):
        assert filecmp.cmp(tmp_path / f"r.{ext}", tmp_path / f"ref.{ext}", shallow=False)


def test_multi_key_each_finalized(shared_data, gpt2_tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lines = (shared_data / "domain" / "gsm8k_test.jsonl").read_text().splitlines()[:100]
    src = tmp_path / "g.jsonl"
    src.write_text("\n".join(lines) + "\n")
    s = pp.preprocess(_cfg(src, gpt2_tokenizer_dir, tmp_path / "g", json_keys=("question", "answer")))
    assert set(s["outputs"]) == {"question", "answer"}
    for key in ("question", "answer"):
        ds = IndexedDataset(str(tmp_path / f"g_{key}"))
        assert len(ds) == 100
        assert json.loads((tmp_path / f"g_{key}.meta.json").read_text())["json_key"] == key


@pytest.mark.parametrize(
    "content,expect",
    [
        ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', r"bad\.jsonl:3: bad JSON"),
        ('{"text": "ok"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no key 'text'"),
        ('{"text": 5}\n', r"bad\.jsonl:1: key 'text' holds int"),
    ],
)
def test_bad_json_names_file_and_line(gpt2_tokenizer_dir, tmp_path, content, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(CptError, match=expect):
        pp.preprocess(_cfg(bad, gpt2_tokenizer_dir, tmp_path / "o"))
    assert not (tmp_path / "o.bin").exists()


def test_cli_errors_are_one_line(gpt2_tokenizer_dir, tmp_path, capsys):
    corrupt = tmp_path / "x.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    for inp in (tmp_path / "missing.jsonl", corrupt):
        rc = main(["preprocess", "--input", str(inp), "--tokenizer", str(gpt2_tokenizer_dir), "--out",
                   str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and inp.name in err, err


def test_cli_json_summary(corpus, gpt2_tokenizer_dir, tmp_path, capsys):
    path, docs = corpus
    rc = main(["preprocess", "--input", str(path), "--tokenizer", str(gpt2_tokenizer_dir), "--out", str(tmp_path / "c"),
               "--append-eod", "--workers", "2", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["outputs"]["text"]["documents"] == len([t for t in docs if t])


def test_library_config_resolves_tokenizer_shortcut(tmp_path, monkeypatch):
    """PreprocessConfig(tokenizer="@gpt2") built as a library resolves the shortcut itself (it made "@gpt2" a path
    under the working directory before: "tokenizer '@gpt2' not found")."""
    from cpt_megatron.tokenizer.load import resolve_spec

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}: some words"}) + "\n" for i in range(5)))
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(src, "@gpt2", tmp_path / "o", fast=False)
    assert cfg.tokenizer == resolve_spec("@gpt2")
    s = pp.preprocess(cfg)
    assert s["outputs"]["text"]["documents"] == 5
    with pytest.raises(CptError, match="unknown tokenizer shortcut '@nope'"):
        _cfg(src, "@nope", tmp_path / "x")


def test_preprocess_import_is_light():
    code = "import sys, cpt_megatron.data.preprocess, cpt_megatron.cli.preprocess; " \
           "bad = [m for m in ('torch', 'megatron', 'transformers') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_uint16_array_dtype_for_small_vocab():
    assert np.dtype(pp.optimal_dtype(50257)).name == "uint16"


def _megatron_bytes(docs, ids_of, eod, dtype, out):
    """PREFIX.bin/.idx exactly as Megatron's tools/preprocess_data.py writes them (document level,
    --append-eod): its Encoder drops empty sentences and appends EOD only to a non-empty document,
    then `IndexedDatasetBuilder.add_document(ids, lengths)` -- for an empty document ([], [])."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(f"{out}.bin", dtype=dtype)
    for t in docs:
        ids = ids_of(t)
        if ids:
            ids = ids + [eod]
        b.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)] if ids else [])
    b.finalize(f"{out}.idx")


def test_keep_empty_is_byte_identical_to_megatron(gpt2_tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from cpt_megatron.tokenizer.load import load_tokenizer

    # empty documents first, last, in runs and on shard boundaries (chunk_bytes cuts every ~3 lines)
    docs = ["", "Alpha beta.", "", "", "Gamma delta epsilon.", "zeta", "", "eta theta", "iota", ""]
    docs = docs * 3
    src = tmp_path / "e.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = load_tokenizer(gpt2_tokenizer_dir)
    _megatron_bytes(docs, lambda t: tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id, np.uint16,
                    tmp_path / "meg")
    for name, kw in (("w1", {}), ("w2", {"workers": 2}), ("hf", {"fast": False})):
        s = pp.preprocess(_cfg(src, gpt2_tokenizer_dir, tmp_path / name, keep_empty=True, chunk_bytes=60, **kw))
        o = s["outputs"]["text"]
        assert (o["documents"], o["empty_docs"], o["empty_docs_skipped"]) == (len(docs), 15, 0)
        for ext in ("bin", "idx"):
            assert filecmp.cmp(tmp_path / f"meg.{ext}", tmp_path / f"{name}.{ext}", shallow=False), (name, ext)
    ds = IndexedDataset(str(tmp_path / "w1"))
    di = ds.document_indices
    assert len(di) == len(docs) + 1 and di[1] == 0 and len(ds) == len([t for t in docs if t])
    # without the flag they are skipped (and counted)
    s = pp.preprocess(_cfg(src, gpt2_tokenizer_dir, tmp_path / "skip"))
    assert s["outputs"]["text"]["documents"] == 15 and s["outputs"]["text"]["empty_docs_skipped"] == 15


@pytest.mark.parametrize("fast", [True, False], ids=["tiktoken", "hf"])
def test_special_token_text_never_yields_eod(gpt2_tokenizer_dir, tmp_path, fast):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["a <|endoftext|> b", "<|endoftext|>", "x<|endoftext|><|endoftext|>y " * 50, "plain text"]
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    s = pp.preprocess(_cfg(src, gpt2_tokenizer_dir, tmp_path / "s", fast=fast))
    assert s["encoder"].startswith("tiktoken" if fast else "hf")
    ds = IndexedDataset(str(tmp_path / "s"))
    eod = 50256
    for i in range(len(docs)):
        ids = ds[i].tolist()
        assert ids[-1] == eod and eod not in ids[:-1], (docs[i], ids)
    # the literal string is text: "<|endoftext|>" -> '<', '|', 'end', 'of', 'text', '|', '>'
    assert ds[1].tolist() == [27, 91, 437, 1659, 5239, 91, 29, eod]


def test_sentencepiece_fast_path_id_for_id_with_hf(mistral_sp_model, tmp_path):
    """Mistral's tokenizer.model.v1: the sentencepiece encoder is verified against HF and used; same bytes
    as the HF encoder; "<s>"/"</s>" in text stay text (BOS 1 / EOS 2 only as the appended EOD)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["Hello world", "  two  spaces\tand\nlines ", "<s> [INST] hi [/INST] </s>", "", "naïve café 日本語 😀",
            "x" * 500, "The patient's BP was 120/80 mmHg."] * 5
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    fast = pp.preprocess(_cfg(src, mistral_sp_model, tmp_path / "sp", keep_empty=True, workers=2, chunk_bytes=300))
    assert fast["encoder"] == "sentencepiece (verified against HF)"
    again = pp.preprocess(_cfg(src, mistral_sp_model, tmp_path / "sp2", keep_empty=True))  # cached verdict
    hf = pp.preprocess(_cfg(src, mistral_sp_model, tmp_path / "hf", keep_empty=True, fast=False))
    assert again["encoder"].startswith("sentencepiece") and hf["encoder"].startswith("hf")
    for other in ("sp2", "hf"):
        for ext in ("bin", "idx"):
            assert filecmp.cmp(tmp_path / f"sp.{ext}", tmp_path / f"{other}.{ext}", shallow=False), (other, ext)
    ds = IndexedDataset(str(tmp_path / "sp"))
    assert len(ds.document_indices) == len(docs) + 1
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == 2 and 1 not in ids and 2 not in ids[:-1], ids


def test_sentencepiece_segment_cache_equals_plain_encode(mistral_sp_model):
    """The segment-cached encoder (single-spaced texts split in C, the rest through the segment regex)
    gives sentencepiece's own ids on adversarial whitespace, unicode, byte fallback and digits, across
    batches that reuse and restart the cache; models it cannot segment exactly are refused by name."""
    import random

    from sentencepiece import sentencepiece_model_pb2 as pb

    import cpt_megatron.data.fast_sp as fsp

    mistral_sp_model = str(mistral_sp_model)
    enc = fsp.FastSentencePiece(mistral_sp_model)
    assert enc.segments_why == "ok"
    rng = random.Random(0)
    atoms = ["a", "b", " ", "  ", "\n", "\t", "\r", "1", "23", "é", "😀", "the", "\u3000", "\u00a0", "▁", ".", "ab"]
    texts = ["", " ", "a", " a", "a ", "a  b", "a\nb", "\n\n  x\t\ty ", "12345 6789", "héllo — “q” 𝔘 ｶﾀｶﾅ",
             "\x0b\x0c\r\n", "ab" * 50 + " " * 7 + "z"]
    texts += ["".join(rng.choice(atoms) for _ in range(rng.randrange(0, 40))) for _ in range(600)]
    ref = enc.sp.encode(texts, out_type=int)
    assert [enc.encode_batch(texts[b : b + 50]) for b in range(0, len(texts), 50)] == \
        [ref[b : b + 50] for b in range(0, len(texts), 50)]
    old = fsp._MAX_CACHE
    fsp._MAX_CACHE = 20  # the table starts over mid-stream: same ids
    try:
        enc2 = fsp.FastSentencePiece(mistral_sp_model)
        assert sum((enc2.encode_batch(texts[b : b + 50]) for b in range(0, len(texts), 50)), []) == ref
        assert len(enc2._index) <= max(20, 50 * 40)
    finally:
        fsp._MAX_CACHE = old
    m = pb.ModelProto()
    m.ParseFromString(open(mistral_sp_model, "rb").read())
    m.normalizer_spec.remove_extra_whitespaces = True
    assert fsp.segmenter(m.SerializeToString())[0] is None
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.name = "nmt_nfkc"
    assert "identity" in fsp.segmenter(m.SerializeToString())[2]
