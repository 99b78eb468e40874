"""Per-document filters: length (characters, tokens) and Gopher-style quality heuristics.

Each filter returns None to keep the document or a short reason string (counted in report.json).
"""

from __future__ import annotations

import re
from collections import Counter

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


def _top_ngram_frac(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(w) for w in gram) * count / total_chars


def _dup_ngram_frac(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


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
    for n, limit in sorted((q.max_top_ngram_char_frac or {}).items()):
        if _top_ngram_frac(words, int(n), total_chars) > limit:
            return f"top_{n}gram"
    for n, limit in sorted((q.max_dup_ngram_char_frac or {}).items()):
        if _dup_ngram_frac(words, int(n), total_chars) > limit:
            return f"dup_{n}gram"
    return None
