"""Per-document filters: length (characters, tokens) and Gopher-style quality heuristics.

Each filter returns None to keep the document or a short reason string (counted in report.json).
"""

from __future__ import annotations

import re

from cpt_megatron.curate.config import LengthConfig, QualityConfig

__all__ = ["LengthFilter", "quality_reason"]

_BULLET = re.compile(r"^\s*[-*•‣◦⁃●▪]")
_ELLIPSIS = re.compile(r"(\.\.\.|…)\s*$")


class LengthFilter:
    def __init__(self, cfg: LengthConfig):
        self.cfg = cfg
        self._tok = None

    def _count_tokens(self, text: str) -> int:
        if self._tok is None:
            from cpt_megatron.tokenizer.load import load_tokenizer  # lazy: imports transformers

            self._tok = load_tokenizer(self.cfg.tokenizer)
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def __call__(self, text: str) -> str | None:
        c = self.cfg
        n = len(text)
        if c.min_chars and n < c.min_chars:
            return f"chars<{c.min_chars}"
        if c.max_chars and n > c.max_chars:
            return f"chars>{c.max_chars}"
        if c.min_tokens or c.max_tokens:
            t = self._count_tokens(text)
            if c.min_tokens and t < c.min_tokens:
                return f"tokens<{c.min_tokens}"
            if c.max_tokens and t > c.max_tokens:
                return f"tokens>{c.max_tokens}"
        return None


def _dup_frac(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of their characters)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    n_dup = chars_dup = 0
    for it in items:
        if it in seen:
            n_dup += 1
            chars_dup += len(it)
        else:
            seen.add(it)
    total_chars = sum(len(i) for i in items) or 1
    return n_dup / len(items), chars_dup / total_chars


def _ngram_fracs(words: list[str], total_chars: int, top_ns, dup_ns) -> tuple[dict, dict]:
    """{n: top n-gram char share}, {n: duplicated n-gram char share}, vectorized with numpy."""
    import numpy as np

    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    ids = np.fromiter(map(vocab.__getitem__, words), np.uint64, len(words))
    lens = np.fromiter(map(len, words), np.int64, len(words))
    top, dup = {}, {}
    g, have = ids, 1  # g[i]: hash of the `have`-gram at word i (polynomial in the word ids, mod 2^64)
    for n in sorted(set(top_ns) | set(dup_ns)):
        if len(words) < n:
            top[n] = dup[n] = 0.0
            continue
        while have < n:  # extend every gram by one word: h_{k+1}[i] = h_k[i] * P + ids[i + k]
            g = g[:-1] * np.uint64(1_000_003) + ids[have:]
            have += 1
        order = np.argsort(g, kind="stable")  # equal n-grams adjacent, earliest first
        sg = g[order]
        run_start = np.flatnonzero(np.concatenate([[True], sg[1:] != sg[:-1]]))
        run_len = np.diff(np.append(run_start, len(sg)))
        count = np.empty(len(g), np.int64)
        count[order] = np.repeat(run_len, run_len)  # each n-gram's number of occurrences
        if n in top_ns:
            r = int(np.argmax(run_len))  # the most frequent, ties to the smallest hash (as np.unique)
            first = int(order[run_start[r]])
            top[n] = 0.0 if run_len[r] < 2 else float(lens[first : first + n].sum() * run_len[r]) / total_chars
        if n in dup_ns:
            starts = np.flatnonzero(count > 1)
            covered = np.zeros(len(words) + 1, dtype=np.int64)
            covered[starts] += 1  # starts are distinct: plain fancy updates suffice
            covered[starts + n] -= 1
            dup[n] = float(lens[np.cumsum(covered)[: len(words)] > 0].sum()) / total_chars
    return top, dup


def quality_reason(text: str, q: QualityConfig) -> str | None:
    """The first Gopher rule `text` fails, or None."""
    words = text.split()
    nw = len(words)
    if q.min_words is not None and nw < q.min_words:
        return f"words<{q.min_words}"
    if q.max_words is not None and nw > q.max_words:
        return f"words>{q.max_words}"
    if nw == 0:
        return "no_words"
    total_chars = sum(map(len, words))
    mean = total_chars / nw
    if q.min_mean_word_len is not None and mean < q.min_mean_word_len:
        return "mean_word_len_low"
    if q.max_mean_word_len is not None and mean > q.max_mean_word_len:
        return "mean_word_len_high"
    if q.max_symbol_word_ratio is not None:
        sym = text.count("#") + text.count("...") + text.count("…")
        if sym / nw > q.max_symbol_word_ratio:
            return "symbol_word_ratio"
    if q.min_alpha_word_frac is not None:
        alpha = sum(any(map(str.isalpha, w)) for w in words)
        if alpha / nw < q.min_alpha_word_frac:
            return "alpha_word_frac"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if q.max_bullet_line_frac is not None and sum(bool(_BULLET.match(ln)) for ln in lines) / len(lines) > q.max_bullet_line_frac:
            return "bullet_lines"
        if q.max_ellipsis_line_frac is not None and sum(bool(_ELLIPSIS.search(ln)) for ln in lines) / len(lines) > q.max_ellipsis_line_frac:
            return "ellipsis_lines"
        frac, cfrac = _dup_frac(lines)
        if q.max_dup_line_frac is not None and frac > q.max_dup_line_frac:
            return "dup_lines"
        if q.max_dup_line_char_frac is not None and cfrac > q.max_dup_line_char_frac:
            return "dup_line_chars"
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    frac, cfrac = _dup_frac(paras)
    if q.max_dup_para_frac is not None and frac > q.max_dup_para_frac:
        return "dup_paragraphs"
    if q.max_dup_para_char_frac is not None and cfrac > q.max_dup_para_char_frac:
        return "dup_paragraph_chars"
    tops = {int(n): v for n, v in (q.max_top_ngram_char_frac or {}).items()}
    dups = {int(n): v for n, v in (q.max_dup_ngram_char_frac or {}).items()}
    if tops or dups:
        top, dup = _ngram_fracs(words, total_chars, tops, dups)
        for n, limit in sorted(tops.items()):
            if top[n] > limit:
                return f"top_{n}gram"
        for n, limit in sorted(dups.items()):
            if dup[n] > limit:
                return f"dup_{n}gram"
    return None
