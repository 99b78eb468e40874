"""A faster encoder for byte-level BPE tokenizers (GPT-2, Llama-3 style), verified against HF.

tiktoken's BPE is several times faster per core than HF tokenizers for byte-level BPE. It is used
only when (1) the HF fast tokenizer's backend is a plain byte-level BPE (no normalizer, no dropout,
merge order consistent with the ids, so tiktoken's rank = token id) and (2) the ids it produces are
identical to HF's on a probe set plus a sample of the corpus. Otherwise we fall back to HF.

The verdict is cached per (tokenizer files' sha256, tiktoken, tokenizers, transformers versions) in
`$CPT_CACHE_DIR/fast_bpe/` (default `~/.cache/cpt_megatron`), together with the tokenizer's facts
(vocab size, EOD id), so a later run starts without importing transformers (or torch).

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


_CACHE_FORMAT = 3  # 2: special tokens encoded as text (records carry the `special` list); 3: sentencepiece segments


def cache_key(tokenizer_sha256: dict) -> str:
    blob = json.dumps(
        [sorted(tokenizer_sha256.items()), _version("tiktoken"), _version("tokenizers"), _version("transformers"),
         _version("sentencepiece"), _CACHE_FORMAT]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class FastBPE:
    """tiktoken encoder whose ranks are the HF token ids; non-special added tokens are matched like HF
    does, special ones (`special`) are encoded as plain text."""

    name = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], pattern: str, added: dict[str, int], special=()):
        import tiktoken

        self.ranks, self.pattern, self.added, self.special = ranks, pattern, added, sorted(special)
        self.enc = tiktoken.Encoding(
            name="cpt_fast_bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=dict(added)
        )
        self._allowed = set(added) - set(special)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        enc, allowed = self.enc.encode, self._allowed
        return [enc(t, allowed_special=allowed, disallowed_special=()) for t in texts]

    def encode_flat(self, texts: list[str]):
        return flatten_ids(self.encode_batch(texts))

    def __getstate__(self):
        return (self.ranks, self.pattern, self.added, self.special)

    def __setstate__(self, state):
        self.__init__(*state)

    @classmethod
    def from_hf(cls, hf_tok) -> tuple[FastBPE | None, str]:
        """Build from an HF fast tokenizer, or (None, reason) when it is not a plain byte-level BPE."""
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
        if len(ranks) != len(vocab) or not all(bytes([b]) in ranks for b in range(256)):
            return None, "vocab lacks some single bytes"
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
            return cls(ranks, pattern, added, special), "ok"
        except Exception as e:  # a regex tiktoken cannot compile, duplicate ranks, ...
            return None, f"tiktoken refused it: {e}"


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
        fast, why = FastBPE.from_hf(hf_tok)
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
        return record, FastBPE(ranks, record["pattern"], record["added"], record["special"])
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
                      "special": fast.special}
        with atomic_file(meta_path) as f:
            json.dump({**record, "fast": fast is not None}, f)
    except OSError:
        pass  # a read-only home only costs start-up time
