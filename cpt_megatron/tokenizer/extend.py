"""Extend a BPE tokenizer with domain tokens so that ordinary encoding uses them and old ids never move.

Method: continued BPE training. Each domain word (a pre-token, in the model's own alphabet: byte-level
characters for GPT-2/Llama 3/SmolLM2, "▁"-prefixed pieces for Llama 2/Mistral SentencePiece) is first
split exactly as the BASE tokenizer splits it. BPE training then continues from that state: the most
frequent adjacent pair across the domain corpus becomes a new merge and a new token, repeatedly. The
chosen pieces are therefore frequent in the domain AND fragmented by the base (a pair only exists where
the base stopped merging).

Why this is consistent: the new merges are appended after the base merges, so they have the lowest
priority. Base merges only combine base tokens, so encoding with the extended model runs every base
merge first (identical to the base encoding), then the new merges in order, exactly as in training.
So every new token is reachable by ordinary encoding of plain text (no `add_tokens`, no special
"added token" matching), text the new merges never touch encodes to the same ids as before, and
decode(encode(x)) == x holds whenever it holds for the base (tokens are still concatenations of bytes
or pieces; byte-fallback and unknown tokens are never merged).

A separately trained domain BPE would not do: its pieces are often unreachable through the base's
merge path (the base splits "xabcd" as "xa"+"bcd", so a piece "abc" never fires).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from cpt_megatron.errors import CptError
from cpt_megatron.utils import check_text_file

__all__ = [
    "ExtendResult",
    "extend_tokenizer",
    "extend_backend",
    "iter_text",
    "subtoken_map",
    "new_token_ids",
]

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPLIT_METASPACE = re.compile(r"▁[^▁]*|[^▁]+")


@dataclasses.dataclass
class ExtendResult:
    """What `extend_tokenizer` did; `to_dict()` is the CLI's JSON summary and `extension.json`."""

    out_dir: str
    base: str
    style: str  # "byte-level" or "sentencepiece"
    base_vocab_size: int  # len(base tokenizer)
    vocab_size: int  # len(new tokenizer)
    num_new_tokens: int
    num_new_chars: int  # single characters added to the vocab (SentencePiece style: were byte fallback)
    num_merges_added: int  # includes merges whose result already was a base token
    first_new_id: int
    num_domain_words: int
    num_unique_words: int
    domain_tokens_before: int
    domain_tokens_after: int  # on the training text, from the training simulation
    stop_reason: str
    marks_joined: bool  # pre-tokenizer rewritten so combining marks stay inside words
    num_multiword_tokens: int  # phrases such as " blood pressure" (matched at word boundaries)
    sample_new_tokens: list[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def iter_text(paths: Iterable[str | os.PathLike], max_chars: int | None = None) -> Iterator[str]:
    """Lines of the input files (JSONL: the string fields of each record), up to `max_chars` in all."""
    total = 0
    for path in paths:
        p = check_text_file(path, "input", hint="give plain-text or .jsonl files")
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                if p.suffix == ".jsonl":
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    line = "\n".join(v for v in rec.values() if isinstance(v, str)) + "\n"
                yield line
                total += len(line)
                if max_chars is not None and total >= max_chars:
                    return


def _style(tj: dict) -> str:
    model = tj["model"]
    if model.get("type") != "BPE":
        raise CptError(
            f"extend supports BPE tokenizers (byte-level or SentencePiece-BPE); this one is {model.get('type')}"
        )
    if model.get("byte_fallback") or "▁" in json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")]):
        return "sentencepiece"
    return "byte-level"


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _add_marks(pattern: str) -> str:
    r"""Make a pre-tokenizer regex treat combining marks (\p{M}) as letters.

    The GPT-2/Llama 3 patterns split words at every \p{M}: Devanagari vowel signs and viramas are
    marks, so " किताब" becomes " क", "ि", "त", "ा", "ब" and no merge can ever build a Hindi word.
    Text without combining marks (English in NFC) pre-tokenizes exactly as before.
    """
    out, depth, i = [], 0, 0
    while i < len(pattern):
        if pattern[i] == "\\":
            tok = pattern[i : i + 5] if pattern.startswith(r"\p{L}", i) else pattern[i : i + 2]
            if tok == r"\p{L}":
                out.append(r"\p{L}\p{M}" if depth else r"[\p{L}\p{M}]")
            else:
                out.append(tok)
            i += len(tok)
            continue
        if pattern[i] == "[":
            depth += 1
        elif pattern[i] == "]" and depth:
            depth -= 1
        out.append(pattern[i])
        i += 1
    return "".join(out)


def _join_marks(tj: dict) -> bool:
    """Rewrite the pre-tokenizer of a tokenizer.json dict in place so marks join words; False if unknown."""
    pre = tj.get("pre_tokenizer")
    if pre is None:
        return False
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        byte_level = dict(pre, use_regex=False)
        split = {"type": "Split", "pattern": {"Regex": _add_marks(GPT2_PATTERN)}, "behavior": "Isolated",
                 "invert": False}
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
        return True
    if pre.get("type") == "Sequence":
        changed = False
        for p in pre["pretokenizers"]:
            if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
                new = _add_marks(p["pattern"]["Regex"])
                changed |= new != p["pattern"]["Regex"]
                p["pattern"]["Regex"] = new
            elif p.get("type") == "ByteLevel" and p.get("use_regex", True):
                return False  # two regex stages: not a layout we know how to rewrite safely
        return changed
    return False


def _mark_share(lines: list[str]) -> float:
    import unicodedata

    letters = marks = 0
    for line in lines[:2000]:
        for ch in line:
            cat = unicodedata.category(ch)
            letters += cat[0] == "L"
            marks += cat[0] == "M"
    return marks / max(1, letters + marks)


def check_scripts(scripts: tuple[str, ...]) -> tuple[str, ...]:
    """Upper-cased `scripts`; an unknown name (no Unicode letter's name starts with it) is one CptError."""
    import unicodedata

    scripts = tuple(s.strip().upper() for s in scripts if s.strip())
    names = [unicodedata.name(chr(cp), "") for cp in range(0x110000) if chr(cp).isalpha()]
    unknown = [s for s in scripts if not any(n.startswith(s + " ") for n in names)]
    if unknown:
        valid = sorted({n.split()[0] for n in names if n})
        raise CptError(f"--scripts: unknown script {', '.join(unknown)}; use the first word(s) of Unicode letter "
                       f"names, one of: {', '.join(valid)}")
    return scripts


def _in_scripts(text: str, scripts: tuple[str, ...]) -> bool:
    import unicodedata

    return any(unicodedata.name(ch, "").startswith(scripts) for ch in text if ch.isalpha() or ch.isprintable())


def _words(backend, lines: Iterable[str], style: str, scripts: tuple[str, ...] | None = None) -> Counter:
    """Pre-tokens in the model's alphabet with their frequencies (only those with a char of `scripts`)."""
    counts: Counter = Counter()
    norm, pre = backend.normalizer, backend.pre_tokenizer
    for line in lines:
        s = norm.normalize_str(line) if norm is not None else line
        if pre is None:
            pieces = [s]
        elif scripts and style == "byte-level":
            pieces = [p for p, (i, j) in pre.pre_tokenize_str(s) if _in_scripts(s[i:j], scripts)]
        else:
            pieces = [p for p, _ in pre.pre_tokenize_str(s)]
        if style == "sentencepiece":
            for p in pieces:
                words = _SPLIT_METASPACE.findall(p)
                counts.update(w for w in words if _in_scripts(w, scripts)) if scripts else counts.update(words)
        else:
            counts.update(pieces)
    return counts


def extend_backend(base_backend, lines: Iterable[str], num_new_tokens: int, *, min_frequency: int = 3,
                   max_token_chars: int = 24, scripts: tuple[str, ...] | None = None,
                   join_marks: bool | None = None, multiword: bool | None = None, max_phrase_words: int = 4,
                   max_phrase_chars: int = 32, common_rank: int = 2000):
    """Continued BPE training on `lines`; returns (new tokenizers.Tokenizer, stats dict).

    `num_new_tokens` counts new vocabulary entries (ids); merges whose result already is a base token
    cost nothing. Stops early when the best pair is rarer than `min_frequency`. `scripts` (Unicode
    name prefixes such as "DEVANAGARI") restricts learning to pre-tokens with a character of those
    scripts, so general (e.g. English) text keeps its encoding. `join_marks` rewrites a byte-level
    pre-tokenizer so combining marks stay inside words (needed for Indic scripts); None: on when more
    than 5% of the domain text's letters are marks.

    `multiword` (None: on for GPT-2-style byte-level tokenizers without `scripts`) also offers
    multi-word tokens (" blood pressure"): phrases of up to `max_phrase_words` base pre-tokens and
    `max_phrase_chars` characters that contain at least one base token with id >= `common_rank` (so
    " of the" is not one), chosen by their real saving on the domain text; the budget goes to whichever
    of phrases and within-word merges saves more tokens (see `tokenizer/phrases.py`).
    """
    from tokenizers import Tokenizer

    if num_new_tokens < 1:
        raise CptError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
    lines = list(lines)
    tj = json.loads(base_backend.to_str())
    style = _style(tj)
    base_backend, marks_joined = _maybe_join_marks(tj, base_backend, lines, style, join_marks)
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    next_id = max(list(vocab.values()) + [t["id"] for t in tj.get("added_tokens", [])]) + 1
    first_new_id = next_id
    barrier_ids = {t["id"] for t in tj.get("added_tokens", [])}
    if model.get("unk_token") in vocab:
        barrier_ids.add(vocab[model["unk_token"]])
    multiword = _want_multiword(tj, style, scripts, marks_joined, multiword)

    # 1. the domain's pre-tokens (words) with counts, and their base segmentation
    word_counts, pretokens = _domain_words(base_backend, lines, style, scripts, multiword)
    bpe = base_backend.model
    words, freqs, new_chars = _segment(bpe, word_counts, barrier_ids, style, vocab)
    tokens_before = sum(len(s) * f for s, f in zip(words, freqs))

    # 2. SentencePiece style: characters the base only knows as byte fallback become single-char pieces
    #    first (at most a quarter of the budget); a char in the vocab is used directly, no merge needed.
    added_chars = _add_new_chars(new_chars, num_new_tokens // 4, min_frequency, vocab, next_id) \
        if style == "sentencepiece" and new_chars else []
    next_id += len(added_chars)
    if added_chars:
        for i, w in enumerate(word_counts):
            if None in words[i]:
                words[i] = _with_new_chars([t.value for t in bpe.tokenize(w)], vocab)
    budget = num_new_tokens - len(added_chars)

    # 3. learn: within-word merges (continued BPE), or merges and multi-word phrases competing for the budget
    phrase_tokens, phrase_regex = [], None
    if multiword:
        new_tokens_ww, new_merges, phrase_tokens, phrase_regex, after, stop = _learn_with_phrases(
            bpe, pretokens, word_counts, words, budget, vocab, barrier_ids, min_frequency=min_frequency,
            max_token_chars=max_token_chars, max_phrase_words=max_phrase_words, max_phrase_chars=max_phrase_chars,
            common_rank=common_rank)
    else:
        new_tokens_ww, new_merges, _, stop = _continued_bpe(words, freqs, vocab, budget, min_frequency,
                                                            max_token_chars)
        after = sum(len(s) * f for s, f in zip(words, freqs))

    # 4. the new tokenizer: new ids after the base's, merges appended, phrases split out by the pre-tokenizer
    new_tokens = added_chars + new_tokens_ww + phrase_tokens
    for tok in new_tokens_ww + phrase_tokens:
        vocab[tok] = next_id
        next_id += 1
    if phrase_tokens:
        _install_phrase_pretokenizer(tj, phrase_regex)
    merges = model["merges"]
    if merges and isinstance(merges[0], str):
        merges.extend(f"{a} {b}" for a, b in new_merges)
    else:
        merges.extend([a, b] for a, b in new_merges)
    stats = {
        "style": style,
        "num_new_tokens": len(new_tokens),
        "num_new_chars": len(added_chars),
        "num_merges_added": len(new_merges),
        "first_new_id": first_new_id,
        "num_domain_words": sum(freqs),
        "num_unique_words": len(words),
        "domain_tokens_before": tokens_before,
        "domain_tokens_after": after,
        "stop_reason": stop,
        "marks_joined": marks_joined,
        "num_multiword_tokens": len(phrase_tokens),
        "new_tokens": new_tokens,
    }
    return Tokenizer.from_str(json.dumps(tj)), stats


def _maybe_join_marks(tj: dict, base_backend, lines: list[str], style: str, join_marks: bool | None):
    """(backend, marks_joined): with join_marks (None: when > 5% of the letters are combining marks) the
    pre-tokenizer regex is rewritten in `tj` so marks stay inside words, and the base segmentation uses it."""
    from tokenizers import Tokenizer

    if join_marks is None:
        join_marks = style == "byte-level" and _mark_share(lines) > 0.05
    if not join_marks:
        return base_backend, False
    if not _join_marks(tj):
        raise CptError("join_marks: this tokenizer's pre-tokenizer is not a regex we can rewrite")
    return Tokenizer.from_str(json.dumps(tj)), True


def _want_multiword(tj: dict, style: str, scripts, marks_joined: bool, multiword: bool | None) -> bool:
    ok = _multiword_ok(tj, style, scripts, marks_joined)
    if multiword and not ok:
        raise CptError("multi-word tokens need a GPT-2-style byte-level pre-tokenizer without a normalizer "
                       "(and no scripts / joined marks)")
    return ok if multiword is None else multiword


def _domain_words(base_backend, lines: list[str], style: str, scripts, multiword: bool):
    """(Counter of pre-tokens, pretoken sequence or None). With multiword, the pre-tokens come from the GPT-2
    regex as a sequence of ids (phrases need their order), mapped to byte-level strings."""
    pretokens = None
    if multiword:
        from cpt_megatron.tokenizer.phrases import pretoken_ids

        seq, raw_words = pretoken_ids(lines, GPT2_PATTERN)
        counts = np.bincount(seq[seq >= 0], minlength=len(raw_words)).tolist()
        to_bytes = byte_level_map()
        word_counts = Counter({"".join(to_bytes[b] for b in w.encode("utf-8")): c
                               for w, c in zip(raw_words, counts)})
        pretokens = (seq, raw_words, to_bytes)
    else:
        word_counts = _words(base_backend, lines, style, scripts)
    if not word_counts:
        raise CptError("the domain input is empty: nothing to learn new tokens from")
    return word_counts, pretokens


def _segment(bpe, word_counts: Counter, barrier_ids: set, style: str, vocab: dict):
    """Base tokens of each word (None = never merged: byte fallback / unknown), counts, and the characters
    SentencePiece only knows as byte fallback."""
    words: list[list[str]] = []
    freqs: list[int] = []
    new_chars: Counter = Counter()
    for w, c in word_counts.items():
        syms = [None if t.id in barrier_ids or (style == "sentencepiece" and _BYTE_PIECE.match(t.value)) else t.value
                for t in bpe.tokenize(w)]
        if style == "sentencepiece" and None in syms:
            for ch in w:
                if ch not in vocab:
                    new_chars[ch] += c
        words.append(syms)
        freqs.append(c)
    return words, freqs, new_chars


def _add_new_chars(new_chars: Counter, most: int, min_frequency: int, vocab: dict, next_id: int) -> list[str]:
    added = []
    for ch, c in new_chars.most_common(most):
        if c < min_frequency:
            break
        vocab[ch] = next_id + len(added)
        added.append(ch)
    return added


def _learn_with_phrases(bpe, pretokens, word_counts: Counter, words: list, budget: int, vocab: dict, barrier_ids: set,
                        **kw):
    """Within-word merges and multi-word phrases for one budget (tokenizer/phrases.py)."""
    from cpt_megatron.tokenizer.phrases import phrase_lookahead
    from cpt_megatron.tokenizer.phrases import phrase_regex as make_regex

    seq, raw_words, to_bytes = pretokens
    index = {w: i for i, w in enumerate(word_counts)}
    order = [index["".join(to_bytes[b] for b in w.encode("utf-8"))] for w in raw_words]
    new_tokens_ww, new_merges, phrases, after = _with_phrases(bpe, seq, raw_words, [words[i] for i in order], budget,
                                                              vocab, **kw)
    stop = "budget" if len(new_tokens_ww) + len(phrases) >= budget else "no more frequent pairs or phrases"
    keys = list(word_counts)
    phrase_tokens = ["".join(keys[order[w]] for w in ph) for ph in phrases]
    # a base token never spans two base pre-tokens, but never reuse an existing string anyway
    keep = [j for j, tok in enumerate(phrase_tokens) if tok not in vocab and tok not in new_tokens_ww]
    phrases, phrase_tokens = [phrases[j] for j in keep], [phrase_tokens[j] for j in keep]
    regex = make_regex([("".join(raw_words[w] for w in ph), phrase_lookahead(raw_words[ph[-1]])) for ph in phrases])
    if phrases:
        _check_self_reachable(bpe, vocab, barrier_ids)
    return new_tokens_ww, new_merges, phrase_tokens, regex, after, stop


def _install_phrase_pretokenizer(tj: dict, phrase_regex: str) -> None:
    """Phrases first, then the GPT-2 split, then byte-level mapping; a phrase pre-token in the vocab is one token."""
    byte_level = dict(tj["pre_tokenizer"], use_regex=False)
    split = {"type": "Split", "pattern": {"Regex": f"(?:{phrase_regex})|{GPT2_PATTERN}"},
             "behavior": "Isolated", "invert": False}
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    tj["model"]["ignore_merges"] = True


def _continued_bpe(words: list[list], freqs: list[int], vocab: dict, budget: int, min_frequency: int,
                   max_token_chars: int):
    """Continued BPE on `words` (symbol lists, None = never merged) for up to `budget` new tokens.

    Returns (new token strings, merges, saving of each new token in tokens, stop reason); `words` is
    updated in place. `vocab` is only read: a merge whose result is already a token costs no budget.
    """
    new_tokens: list[str] = []
    savings: list[int] = []
    new_merges: list[tuple[str, str]] = []
    known = set(vocab)
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, (syms, f) in enumerate(zip(words, freqs)):
        for a, b in zip(syms, syms[1:]):
            if a is not None and b is not None:
                pair_count[(a, b)] += f
                where.setdefault((a, b), set()).add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    stop = "budget"
    while len(new_tokens) < budget:
        if not heap:
            stop = "no more pairs"
            break
        neg, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if c != -neg:
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        if c < min_frequency:
            stop = f"best pair occurs < min_frequency={min_frequency} times"
            break
        a, b = pair
        merged = a + b
        if len(merged) > max_token_chars:
            pair_count[pair] = 0  # too long a token: skip this pair for good
            continue
        new_merges.append(pair)
        if merged not in known:
            known.add(merged)
            new_tokens.append(merged)
            savings.append(c)
        for i in where.pop(pair, ()):
            syms, f = words[i], freqs[i]
            out = _merge(syms, a, b, merged)
            if out is syms:
                continue
            delta: dict = {}
            for p in zip(syms, syms[1:]):
                delta[p] = delta.get(p, 0) - 1
            for p in zip(out, out[1:]):
                delta[p] = delta.get(p, 0) + 1
            for p, d in delta.items():
                if d and p[0] is not None and p[1] is not None:
                    pair_count[p] += d * f
                    if d > 0:  # a lower count is caught lazily when its stale heap entry pops
                        where.setdefault(p, set()).add(i)
                        heapq.heappush(heap, (-pair_count[p], p))
            words[i] = out
        pair_count.pop(pair, None)

    return new_tokens, new_merges, savings, stop


def byte_level_map() -> dict[int, str]:
    """GPT-2's bytes_to_unicode table (byte -> printable character of the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _multiword_ok(tj: dict, style: str, scripts, marks_joined: bool) -> bool:
    """Multi-word tokens are built for a plain GPT-2 ByteLevel pre-tokenizer (its regex is known)."""
    pre = tj.get("pre_tokenizer") or {}
    return (style == "byte-level" and not scripts and not marks_joined and tj.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True))


def _check_self_reachable(bpe, vocab: dict, skip_ids: set) -> None:
    """`ignore_merges` is only a no-op for base words if every base token is its own BPE result."""
    bad = [t for t, i in vocab.items() if i not in skip_ids and [x.value for x in bpe.tokenize(t)] != [t]]
    if bad:
        raise CptError(f"multi-word tokens need ignore_merges, which would change how {len(bad)} base tokens "
                       f"encode (e.g. {bad[:3]}); use multiword=False")


def _with_phrases(bpe, seq, raw_words: list[str], syms: list[list], budget: int, vocab: dict, *,
                  min_frequency: int, max_token_chars: int, max_phrase_words: int, max_phrase_chars: int,
                  common_rank: int):
    """Split `budget` between multi-word phrases and within-word merges by saving; see phrases.py.

    `syms[i]`: base symbols of pre-token `raw_words[i]`. Returns (within-word tokens, merges,
    phrases as word-id tuples, domain tokens after).
    """
    from cpt_megatron.tokenizer.phrases import count_ngrams, cover, select_phrases

    cost = np.array([len(s) for s in syms], dtype=np.int64)
    chars = np.array([len(w) for w in raw_words], dtype=np.int64)
    ok = np.array([max((vocab.get(t, 0) for t in s if t is not None), default=0) >= common_rank
                   for s in syms], dtype=bool)
    cands = count_ngrams(seq, cost, chars, ok, max_words=max_phrase_words, max_chars=max_phrase_chars,
                         min_count=max(2, min_frequency))
    ranked = select_phrases(seq, cands, budget, max_words=max_phrase_words)

    def within_words(phrases, n):
        _, covered = cover(seq, phrases, max_phrase_words)
        freq = np.bincount(seq[(~covered) & (seq >= 0)], minlength=len(raw_words)).tolist()
        live = [i for i, f in enumerate(freq) if f]
        ws = [list(syms[i]) for i in live]
        fs = [freq[i] for i in live]
        toks, merges, saved, _ = _continued_bpe(ws, fs, vocab, n, min_frequency, max_token_chars)
        return toks, merges, saved, sum(len(s) * f for s, f in zip(ws, fs))

    # first pass: within-word savings where no candidate phrase applies, then take the best of both lists
    _, _, saved, _ = within_words([p for p, _ in ranked], budget)
    saved = sorted(saved, reverse=True)
    k = i = 0
    while k + i < budget and (k < len(ranked) or i < len(saved)):
        if i >= len(saved) or (k < len(ranked) and ranked[k][1] >= saved[i]):
            k += 1
        else:
            i += 1
    while True:
        phrases = [p for p, _ in ranked[:k]]
        toks, merges, _, after = within_words(phrases, budget - k)
        if len(toks) + k >= budget or k >= len(ranked):
            break
        k = min(len(ranked), budget - len(toks))  # within-word ran out of pairs: more phrases
    uses, _ = cover(seq, phrases, max_phrase_words)
    return toks, merges, phrases, after + sum(uses)


def _with_new_chars(values: list[str], vocab: dict) -> list:
    """Base token values of a word -> symbols; byte pieces of a character now in `vocab` become it."""
    out: list = []
    buf = bytearray()
    for v in values:
        if not _BYTE_PIECE.match(v):
            out.append(v)
            continue
        buf.append(int(v[3:5], 16))
        lead = buf[0]
        need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
        if len(buf) >= need:
            ch = bytes(buf).decode("utf-8", errors="replace")
            out.extend([ch] if len(ch) == 1 and ch in vocab else [None] * len(buf))
            buf.clear()
    out.extend([None] * len(buf))
    return out


def _merge(syms: list, a: str, b: str, merged: str) -> list:
    out = []
    i, n, changed = 0, len(syms), False
    while i < n:
        if i + 1 < n and syms[i] == a and syms[i + 1] == b:
            out.append(merged)
            i += 2
            changed = True
        else:
            out.append(syms[i])
            i += 1
    return out if changed else syms


def extend_tokenizer(base: str | os.PathLike, inputs: list[str | os.PathLike], num_new_tokens: int,
                     out_dir: str | os.PathLike, *, min_frequency: int = 3, max_chars: int | None = None,
                     scripts: tuple[str, ...] | None = None, join_marks: bool | None = None,
                     multiword: bool | None = None, overwrite: bool = False) -> ExtendResult:
    """Learn up to `num_new_tokens` domain tokens from `inputs` and save an HF tokenizer dir at `out_dir`.

    Old ids keep their strings; new ids start at the old `len(tokenizer)`. `out_dir/extension.json`
    records the base, inputs and new tokens; load the result with `load_tokenizer(out_dir)`.
    """
    from transformers import PreTrainedTokenizerFast

    from cpt_megatron.tokenizer.load import load_tokenizer
    from cpt_megatron.utils import atomic_dir, write_json

    scripts = check_scripts(scripts) if scripts else None
    base_tok = load_tokenizer(base)
    backend, stats = extend_backend(
        base_tok.backend_tokenizer, iter_text(inputs, max_chars), num_new_tokens, min_frequency=min_frequency,
        scripts=scripts, join_marks=join_marks,
        multiword=multiword,
    )
    special = {k: getattr(base_tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(base_tok, k, None) is not None}
    new_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        split_special_tokens=bool(getattr(base_tok, "split_special_tokens", False)),
        model_max_length=base_tok.model_max_length,
        **special,
    )
    _check_old_ids(base_tok, new_tok)
    new_tokens = stats.pop("new_tokens")
    result = ExtendResult(
        out_dir=str(out_dir),
        base=str(base),
        base_vocab_size=len(base_tok),
        vocab_size=len(new_tok),
        sample_new_tokens=[_show(backend, t) for t in new_tokens[:20]],
        **stats,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        new_tok.save_pretrained(str(tmp))
        write_json(Path(tmp) / "extension.json", {
            **result.to_dict(),
            "inputs": [str(p) for p in inputs],
            "method": "continued BPE: base segmentation, then most frequent domain pairs as appended merges"
                      + ("; multi-word tokens matched by the pre-tokenizer" if result.num_multiword_tokens else ""),
            "new_tokens": [_show(backend, t) for t in new_tokens],
        })
    return result


def _show(backend, piece: str) -> str:
    """A new token as readable text (byte-level pieces decoded; partial UTF-8 shown with U+FFFD)."""
    tid = backend.token_to_id(piece)
    return backend.decode([tid], skip_special_tokens=False) if tid is not None else piece


def _check_old_ids(base_tok, new_tok) -> None:
    old, new = base_tok.get_vocab(), new_tok.get_vocab()
    moved = [t for t, i in old.items() if new.get(t) != i]
    if moved:
        raise AssertionError(f"extension moved {len(moved)} existing ids, e.g. {moved[:3]}")


def _alphabet(tj: dict) -> tuple:
    """What decides the model's symbol alphabet: normalizer, decoder, byte-level/metaspace mapping.

    A different word-splitting regex (multi-word phrases, joined combining marks) keeps the alphabet.
    """
    def flat(p):
        if not p:
            return []
        return [q for x in p.get("pretokenizers", []) for q in flat(x)] if p.get("type") == "Sequence" else [p]

    kinds = sorted(json.dumps({k: v for k, v in p.items() if k in ("type", "replacement", "prepend_scheme")})
                   for p in flat(tj.get("pre_tokenizer")) if p.get("type") in ("ByteLevel", "Metaspace"))
    return json.dumps(tj.get("normalizer")), json.dumps(tj.get("decoder")), kinds


def new_token_ids(base_tok, new_tok) -> list[int]:
    """Ids of `new_tok` that `base_tok` does not have (the rows a resized embedding must add)."""
    base_vocab = base_tok.get_vocab()
    return sorted(i for t, i in new_tok.get_vocab().items() if base_vocab.get(t) != i)


def subtoken_map(base_tok, new_tok) -> dict[int, list[int]]:
    """For each token id new in `new_tok`: the BASE token ids its string splits into.

    Used to initialize new embedding rows (`cpt resize-embeddings --init subtoken-mean`: the mean of
    these base rows). When both tokenizers share the model alphabet (any tokenizer made by
    `extend_tokenizer`), the split is the base BPE model's own segmentation of the piece, i.e. exactly
    the base tokens the piece replaces in running text (byte-level pieces map to byte-level tokens,
    "▁word" to "▁word" pieces, byte-fallback ids included; a multi-word token " blood pressure" to
    " blood" + " pressure": no base merge crosses a word boundary). Otherwise the token's decoded text is
    encoded by the base tokenizer. Raises if an old id changed its string. An empty list (only for a
    token whose text is empty) means: fall back to the global mean.
    """
    base_vocab = base_tok.get_vocab()
    new_vocab = new_tok.get_vocab()
    base_len = len(base_tok)
    bad = [t for t, i in base_vocab.items() if new_vocab.get(t) != i]
    if bad:
        raise CptError(
            f"{len(bad)} base tokens have different ids in the new tokenizer (e.g. {bad[:3]}); "
            "subtoken init needs a tokenizer that extends the base (cpt tokenizer extend)"
        )
    b_json = json.loads(base_tok.backend_tokenizer.to_str())
    n_json = json.loads(new_tok.backend_tokenizer.to_str())
    same_alphabet = _alphabet(b_json) == _alphabet(n_json)
    bpe = base_tok.backend_tokenizer.model
    out: dict[int, list[int]] = {}
    for piece, nid in sorted(new_vocab.items(), key=lambda kv: kv[1]):
        if base_vocab.get(piece) == nid:
            continue
        if nid < base_len:
            raise CptError(f"new token {piece!r} reuses old id {nid}; new ids must start at {base_len}")
        if same_alphabet:
            ids = [t.id for t in bpe.tokenize(piece)]
        else:
            ids = base_tok.encode(new_tok.decode([nid]), add_special_tokens=False)
        out[nid] = ids
    return out
