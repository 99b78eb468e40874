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


def _ngram_ids(ids, n: int):
    """One int64 id per word n-gram (polynomial hash of word ids; collisions are negligible at 2^64)."""
    import numpy as np

    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(1_000_003) + ids[k : len(ids) - n + 1 + k]
    return h


def _ngram_fracs(words: list[str], total_chars: int, top_ns, dup_ns) -> tuple[dict, dict]:
    """{n: top n-gram char share}, {n: duplicated n-gram char share}, vectorized with numpy."""
    import numpy as np

    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64)
    lens = np.array([len(w) for w in words], dtype=np.int64)
    top, dup = {}, {}
    for n in sorted(set(top_ns) | set(dup_ns)):
        if len(words) < n:
            top[n] = dup[n] = 0.0
            continue
        g = _ngram_ids(ids, n)
        uniq, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
        if n in top_ns:
            best = int(np.argmax(counts))
            first = int(np.flatnonzero(inv == best)[0])
            top[n] = 0.0 if counts[best] < 2 else float(lens[first : first + n].sum() * counts[best]) / total_chars
        if n in dup_ns:
            starts = np.flatnonzero(counts[inv] > 1)
            covered = np.zeros(len(words) + 1, dtype=np.int64)
            np.add.at(covered, starts, 1)
            np.add.at(covered, starts + n, -1)
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
    total_chars = sum(len(w) for w in words)
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
        alpha = sum(1 for w in words if any(ch.isalpha() for ch in w))
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
