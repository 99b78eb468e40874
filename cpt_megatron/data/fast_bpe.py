"""A faster encoder for byte-level BPE tokenizers (GPT-2, Llama-3 style), verified against HF.

tiktoken's BPE is several times faster per core than HF tokenizers for byte-level BPE. It is used
only when (1) the HF fast tokenizer's backend is a plain byte-level BPE (no normalizer, no dropout,
merge order consistent with the ids, so tiktoken's rank = token id) and (2) the ids it produces are
identical to HF's on a probe set plus a sample of the corpus. Otherwise we fall back to HF.

The verdict is cached per (tokenizer files' sha256, tiktoken, tokenizers, transformers versions) in
`$CPT_CACHE_DIR/fast_bpe/` (default `~/.cache/cpt_megatron`), together with the tokenizer's facts
(vocab size, EOD id), so a later run starts without importing transformers (or torch).

A vocabulary may lack some single bytes (SmolLM2's lacks 21: the controls U+0004, U+0006, U+0013, U+0014,
U+0016, U+001D, the lead bytes 0xF1/0xF2 of planes 4-11, and bytes UTF-8 never uses). HF's BPE model
(`tokenizers` models/bpe, no byte_fallback, no unk token) then DROPS those bytes from a pre-token before
merging, so its neighbours may merge across the gap ("!\x04!" -> "!!"); tiktoken cannot express that (it
needs every byte). Such vocabularies still get the fast path: the documents that contain a character with
a missing byte in its UTF-8 form (none in MedQuAD or WikiText-103) are encoded by HF itself, every other
document by tiktoken, so the ids equal HF's by construction and are verified like any other.

Special-token strings in a document (a literal "<|endoftext|>" in web text) are encoded as plain text
on every path: HF with `split_special_tokens=True`, tiktoken with those tokens not allowed. Text must
never inject control ids (EOD mid-document). Added tokens that are NOT special still match as HF does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import pickle
import re
from pathlib import Path

from cpt_megatron.tokenizer.extend import byte_level_map  # GPT-2 byte -> unicode table (one copy)
from cpt_megatron.utils import flatten_ids

__all__ = ["FastBPE", "cache_dir", "cache_key", "load_cached", "build_and_verify", "PROBE_TEXTS"]

# Regex of HF's ByteLevel(use_regex=True) pre-tokenizer (= GPT-2's); same as tiktoken's "gpt2" pattern.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE_TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "It's they're we've I'm you'll he'd O'NEIL's",
    "Tabs\tand\nnew lines\r\n\n\n  indented\n",
    "Numbers 1234567 3.14159 -42 1e10 0x1F",
    "Ünïcödé: naïve café – “quotes” — 日本語のテキスト 中文 한국어 العربية हिन्दी தமிழ்",
    "Emoji 😀👍🏽 🇮🇳 and ZWJ 👨‍👩‍👧 ‍ \u200b\u200c\u200d",
    "Code: def f(x):\n    return x**2  # comment\n\tif a!=b: {}[]()<>",
    "Special <|endoftext|> in the middle<|endoftext|>",
    "<s> </s> [INST] <|begin_of_text|> <|eot_id|>",
    "   \n\n\t \u00a0\u3000 mixed whitespace \u2028\u2029",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.org",
    "ALLCAPS CamelCase snake_case kebab-case",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "x" * 3000,
    "",
]


def cache_dir() -> Path:
    return Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache" / "cpt_megatron")) / "fast_bpe"


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "none"


# 2: special tokens encoded as text (records carry the `special` list); 3: sentencepiece segments;
# 4: vocabularies that lack single bytes are fast too (records carry `hf_chars`)
_CACHE_FORMAT = 4


def cache_key(tokenizer_sha256: dict) -> str:
    blob = json.dumps(
        [sorted(tokenizer_sha256.items()), _version("tiktoken"), _version("tokenizers"), _version("transformers"),
         _version("sentencepiece"), _CACHE_FORMAT]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class FastBPE:
    """tiktoken encoder whose ranks are the HF token ids; non-special added tokens are matched like HF
    does, special ones (`special`) are encoded as plain text. With `hf_chars` (a regex character class of
    the characters whose UTF-8 bytes the vocabulary lacks), documents containing one are encoded by the HF
    tokenizer at `hf_spec` (see the module docstring)."""

    name = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], pattern: str, added: dict[str, int], special=(),
                 hf_chars: str | None = None, hf_spec: str | None = None, hf_tok=None):
        import tiktoken

        self.ranks, self.pattern, self.added, self.special = ranks, pattern, added, sorted(special)
        self.hf_chars, self.hf_spec, self._hf = hf_chars, hf_spec, hf_tok
        self.enc = tiktoken.Encoding(
            name="cpt_fast_bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=dict(added)
        )
        self._allowed = set(added) - set(special)
        self._needs_hf = re.compile(hf_chars).search if hf_chars else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        enc, allowed, needs_hf = self.enc.encode, self._allowed, self._needs_hf
        if needs_hf is None:
            return [enc(t, allowed_special=allowed, disallowed_special=()) for t in texts]
        out, gaps = [], []
        for i, t in enumerate(texts):
            if needs_hf(t):
                out.append(None)
                gaps.append(i)
            else:
                out.append(enc(t, allowed_special=allowed, disallowed_special=()))
        if gaps:
            for i, ids in zip(gaps, hf_encode_batch(self._hf_tokenizer(), [texts[i] for i in gaps])):
                out[i] = ids
        return out

    def encode_flat(self, texts: list[str]):
        return flatten_ids(self.encode_batch(texts))

    def _hf_tokenizer(self):
        if self._hf is None:
            from cpt_megatron.tokenizer.load import load_tokenizer

            self._hf = load_tokenizer(self.hf_spec)
        return self._hf

    def __getstate__(self):  # the HF tokenizer is reloaded from hf_spec where needed (a worker process)
        return (self.ranks, self.pattern, self.added, self.special, self.hf_chars, self.hf_spec)

    def __setstate__(self, state):
        self.__init__(*state)

    @classmethod
    def from_hf(cls, hf_tok, tokenizer_path: str | None = None) -> tuple[FastBPE | None, str]:
        """Build from an HF fast tokenizer, or (None, reason) when it is not a plain byte-level BPE.
        `tokenizer_path` (where workers reload HF from) is needed only when the vocabulary lacks single bytes."""
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            return None, "tiktoken not installed"
        spec = json.loads(hf_tok.backend_tokenizer.to_str())
        model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
            return None, "not a byte-level BPE model"
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            return None, "BPE with subword prefix/suffix"
        if norm:
            return None, "tokenizer has a normalizer"
        pattern = _pattern_of(pre)
        if pattern is None:
            return None, f"unsupported pre-tokenizer {pre.get('type')}"
        vocab: dict[str, int] = model["vocab"]
        byte_decoder = {c: b for b, c in byte_level_map().items()}
        ranks: dict[bytes, int] = {}
        try:
            for tok, i in vocab.items():
                ranks[bytes(byte_decoder[c] for c in tok)] = i
        except KeyError:
            return None, "vocab has non byte-level symbols"
        if len(ranks) != len(vocab):
            return None, "vocab has duplicate byte strings"
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        hf_chars = None
        if missing:
            if model.get("unk_token") or tokenizer_path is None:  # unk: HF emits <unk> for the gap (not handled)
                return None, f"vocab lacks {len(missing)} single bytes" + (" and has an unk token"
                                                                           if model.get("unk_token") else "")
            hf_chars = chars_with_bytes(missing)
        # tiktoken merges by the rank of the merged token; HF by merge order. Equal when ids grow with
        # merge order and every merge yields a token with a higher id than its parts.
        last = -1
        for m in model.get("merges", []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            ida, idb, idm = vocab.get(a), vocab.get(b), vocab.get(a + b)
            if ida is None or idb is None or idm is None or idm <= max(ida, idb) or idm <= last:
                return None, "merge order does not follow token ids"
            last = idm
        added, special = {}, []
        for t in spec.get("added_tokens", []):
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"):
                return None, f"added token {t['content']!r} has strip/word/normalized flags"
            if t["content"].encode() in ranks and ranks[t["content"].encode()] != t["id"]:
                return None, "added token collides with the vocab"
            added[t["content"]] = t["id"]
            if t.get("special"):
                special.append(t["content"])
        try:
            return cls(ranks, pattern, added, special, hf_chars, tokenizer_path, hf_tok), "ok"
        except Exception as e:  # a regex tiktoken cannot compile, duplicate ranks, ...
            return None, f"tiktoken refused it: {e}"


def chars_with_bytes(missing_bytes) -> str:
    """A regex character class matching every character whose UTF-8 encoding contains one of these bytes
    (the UTF-8 bytes of all code points computed at once; surrogates have no UTF-8 form and are left out)."""
    import numpy as np

    cp = np.arange(0x110000, dtype=np.int64)
    n = np.select([cp < 0x80, cp < 0x800, cp < 0x10000], [1, 2, 3], 4)
    lead = np.select([n == 1, n == 2, n == 3], [cp, 0xC0 | cp >> 6, 0xE0 | cp >> 12], 0xF0 | cp >> 18)
    units = [lead] + [np.where(n > k, 0x80 | (cp >> (6 * (n - 1 - k))) & 0x3F, lead) for k in (1, 2, 3)]
    hit = np.isin(np.stack(units), np.asarray(sorted(set(missing_bytes)), dtype=np.int64)).any(axis=0)
    hit[0xD800:0xE000] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], hit.astype(np.int8), [0]])))
    ranges = zip(edges[::2].tolist(), (edges[1::2] - 1).tolist())
    return "[" + "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                         for a, b in ranges) + "]"


def _pattern_of(pre: dict) -> str | None:
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return _GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert")
            and "Regex" in (steps[0].get("pattern") or {})
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")
        ):
            return steps[0]["pattern"]["Regex"]
    return None




def hf_encode_batch(hf_tok, texts: list[str]) -> list[list[int]]:
    """HF reference ids: no BOS/EOS (megatron's HuggingFaceTokenizer.text_to_ids does the same), and
    special-token strings in the text encoded as plain text (`split_special_tokens=True`)."""
    return hf_tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def build_and_verify(hf_tok, sample_texts: list[str], spec: str | None = None, threads: int = 1):
    """The fast encoder for this tokenizer (tiktoken for byte-level BPE, sentencepiece for a `.model`)
    if its ids equal HF's on the probes and the sample, else (None, why)."""
    from cpt_megatron.data.fast_sp import FastSentencePiece, is_sentencepiece_model

    if spec is not None and is_sentencepiece_model(spec):
        fast, why = FastSentencePiece.from_model(spec, threads)
    else:
        fast, why = FastBPE.from_hf(hf_tok, spec)
    if fast is None:
        return None, why
    texts = PROBE_TEXTS + list(sample_texts)
    ref = hf_encode_batch(hf_tok, texts)
    got = fast.encode_batch(texts)
    for t, a, b in zip(texts, ref, got):
        if a != b:
            return None, f"{fast.name} ids differ from HF on {t[:40]!r}"
    return fast, "ok"


def _paths(key: str) -> tuple[Path, Path]:
    d = cache_dir()
    return d / f"{key}.json", d / f"{key}.ranks.pkl"


def load_cached(tokenizer_sha256: dict, spec: str | None = None, threads: int = 1):
    """(record, encoder) from the cache; record is None on a miss, encoder None when HF must be used."""
    meta_path, ranks_path = _paths(cache_key(tokenizer_sha256))
    try:
        record = json.loads(meta_path.read_text())
        if not record.get("fast"):
            return record, None
        if record.get("kind") == "sentencepiece":
            from cpt_megatron.data.fast_sp import FastSentencePiece

            return (record, FastSentencePiece(spec, threads)) if spec else (None, None)
        with open(ranks_path, "rb") as f:
            ranks = pickle.load(f)
        if record.get("hf_chars") and not spec:
            return None, None
        return record, FastBPE(ranks, record["pattern"], record["added"], record["special"], record.get("hf_chars"),
                               spec)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError):
        return None, None


def save_cached(tokenizer_sha256: dict, record: dict, fast: FastBPE | None) -> None:
    from cpt_megatron.utils import atomic_file

    meta_path, ranks_path = _paths(cache_key(tokenizer_sha256))
    try:
        if fast is not None and fast.name == "sentencepiece":
            record = {**record, "kind": "sentencepiece"}
        elif fast is not None:
            with atomic_file(ranks_path, "wb") as f:
                pickle.dump(fast.ranks, f, protocol=pickle.HIGHEST_PROTOCOL)
            record = {**record, "kind": "tiktoken", "pattern": fast.pattern, "added": fast.added,
                      "special": fast.special, "hf_chars": fast.hf_chars}
        with atomic_file(meta_path) as f:
            json.dump({**record, "fast": fast is not None}, f)
    except OSError:
        pass  # a read-only home only costs start-up time
