"""Issue 28 item 7: byte-level BPE vocabularies that lack some single bytes (SmolLM2 lacks 21) get the fast
path with ids identical to HF's. HF's BPE model (no byte_fallback, no unk token) drops a byte that has no
token before merging, so its neighbours merge across the gap ("!\\x04!" -> "!!"); documents containing such
a character are encoded by HF, the others by tiktoken (data/fast_bpe.py)."""

from __future__ import annotations

import filecmp
import json
import pickle
import re

import pytest

from cpt_megatron.data import fast_bpe
from cpt_megatron.data.fast_bpe import FastBPE, chars_with_bytes, hf_encode_batch

GAP_TEXTS = ["a\x04b", "!\x04!", "x\x13", "\x04", "start \x06\x06 end", "ok \U00040000 plane 4", "café\x1d!",
             "<|endoftext|>\x04<|endoftext|>", "\U000bffff\U000c0000"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cpt_cache_fast_bpe"))


@pytest.fixture(scope="module")
def gapped_gpt2(gpt2_tokenizer_dir, tmp_path_factory):
    """GPT-2's tokenizer without the single-byte tokens of 0x04 and 0xF1 (and the merges that use them):
    a byte-level BPE with SmolLM2's kind of gap, built in a second."""
    from cpt_megatron.tokenizer.extend import byte_level_map
    from cpt_megatron.tokenizer.load import load_tokenizer

    spec = json.loads(load_tokenizer(gpt2_tokenizer_dir).backend_tokenizer.to_str())
    gone = {byte_level_map()[b] for b in (0x04, 0xF1)}
    model = spec["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in gone}
    model["merges"] = [m for m in model["merges"]
                       if not any(x in gone for x in (m.split(" ") if isinstance(m, str) else m))]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("gapped")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                            eos_token="<|endoftext|>").save_pretrained(out)
    return out, load_tokenizer(out, cache=False)


def test_chars_with_bytes_is_every_char_whose_utf8_has_the_byte():
    cls = re.compile(chars_with_bytes([0x04, 0xF1, 0x80]))
    for cp in [*range(0, 0x110000, 97), 0x04, 0x80, 0x40000, 0x7FFFF, 0x80000]:
        if not 0xD800 <= cp <= 0xDFFF:
            assert bool(cls.search(chr(cp))) == bool({0x04, 0xF1, 0x80} & set(chr(cp).encode())), hex(cp)
    smol = chars_with_bytes([0x4, 0x6, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)])
    assert smol == "[\x04\x06\x13-\x14\x16\x1d\U00040000-\U000bffff]"


def test_vocab_missing_single_bytes_gets_the_fast_path(gapped_gpt2, shared_data):
    path, hf = gapped_gpt2
    assert FastBPE.from_hf(hf) == (None, "vocab lacks 2 single bytes")  # no path to load HF from in workers
    fast, why = FastBPE.from_hf(hf, str(path))
    assert why == "ok" and fast.hf_chars
    wiki = (shared_data / "general" / "wikitext2_raw_test.txt").read_text()[:60_000].split("\n\n")
    texts = GAP_TEXTS + fast_bpe.PROBE_TEXTS + wiki + [w + "\x04" + w for w in wiki[:20]]
    ref = hf_encode_batch(hf, texts)
    assert ref[GAP_TEXTS.index("!\x04!")] == hf.encode("!!", add_special_tokens=False)  # HF merges across the gap
    assert fast.encode_batch(texts) == ref
    worker = pickle.loads(pickle.dumps(fast))  # a preprocess worker reloads HF from the path
    assert worker._hf is None and worker.encode_batch(texts) == ref
    fast2, why = fast_bpe.build_and_verify(hf, texts, str(path))
    assert why == "ok" and fast2 is not None


def test_preprocess_uses_the_fast_path_for_a_gapped_vocab(gapped_gpt2, tmp_path):
    from cpt_megatron.data import preprocess as pp

    path, _ = gapped_gpt2
    docs = ["Hello world. " * 30, "a\x04b " * 10, "plain text again", "tab\tand \U00040000 gap"] * 10
    src = tmp_path / "g.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))

    def run(name, **kw):
        return pp.preprocess(pp.PreprocessConfig(inputs=[str(src)], tokenizer=str(path), out=str(tmp_path / name),
                                                 append_eod=True, progress=False, **kw))

    assert run("fast", workers=2, chunk_bytes=400)["encoder"] == "tiktoken (verified against HF)"
    assert run("cached")["encoder"] == "tiktoken (verified against HF)"  # the cached verdict keeps hf_chars
    assert run("hf", fast=False)["encoder"].startswith("hf")
    for other in ("cached", "hf"):
        for ext in ("bin", "idx"):
            assert filecmp.cmp(tmp_path / f"fast.{ext}", tmp_path / f"{other}.{ext}", shallow=False), (other, ext)


@pytest.mark.slow
@pytest.mark.heavy  # SmolLM2's tokenizer from the GGUF (~10-40 s on 2 shared cores) + 1.5 MB of real text
def test_smollm2_fast_path_is_id_identical_on_medquad_and_wikitext(smollm2_gguf, shared_data):
    from cpt_megatron.tokenizer.load import load_tokenizer

    hf = load_tokenizer(smollm2_gguf)
    fast, why = FastBPE.from_hf(hf, str(smollm2_gguf))
    assert why == "ok" and fast.hf_chars == "[\x04\x06\x13-\x14\x16\x1d\U00040000-\U000bffff]"
    med = (shared_data / "domain" / "medquad_qa.txt").read_text()[:1_000_000]
    wiki = (shared_data / "general" / "wikitext2_raw_test.txt").read_text()[:500_000]
    texts = [x for x in re.split(r"(?m)^(?=# )", med) if x.strip()] + wiki.split("\n \n") + GAP_TEXTS
    assert fast.encode_batch(texts) == hf_encode_batch(hf, texts)
