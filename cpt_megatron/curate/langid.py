"""Per-document language and script identification.

Script: the Unicode block holding most letters. Language: pycld2 (fast, offline; hi/mr/bn/ta/en all
>= 0.99 on FLORES devtest), with langid.py as fallback when cld2 is unsure. Roman-script text goes
through the romanized-Hindi classifier first (neither cld2 nor langid knows romanized Hindi; cld2
mostly answers `un` or `sa`): Hindi-scored documents get `hi-Latn`, and Latin documents whose Hindi word
share is mixed are flagged code-mixed.

Needs the `indic` extra (pycld2, langid), imported on first use.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass

from cpt_megatron.curate.config import LangIdConfig
from cpt_megatron.errors import CptError

__all__ = ["LangResult", "detect_script", "identify"]

# (first code point, last code point, ISO 15924 script)
_BLOCKS = (
    (0x0041, 0x024F, "Latn"), (0x0370, 0x03FF, "Grek"), (0x0400, 0x04FF, "Cyrl"), (0x0590, 0x05FF, "Hebr"),
    (0x0600, 0x06FF, "Arab"), (0x0750, 0x077F, "Arab"), (0x0900, 0x097F, "Deva"), (0x0980, 0x09FF, "Beng"),
    (0x0A00, 0x0A7F, "Guru"), (0x0A80, 0x0AFF, "Gujr"), (0x0B00, 0x0B7F, "Orya"), (0x0B80, 0x0BFF, "Taml"),
    (0x0C00, 0x0C7F, "Telu"), (0x0C80, 0x0CFF, "Knda"), (0x0D00, 0x0D7F, "Mlym"), (0x0E00, 0x0E7F, "Thai"),
    (0x1C50, 0x1C7F, "Olck"), (0x3040, 0x30FF, "Jpan"), (0x4E00, 0x9FFF, "Hani"), (0xAC00, 0xD7AF, "Hang"),
)  # fmt: skip


def _script_of(ch: str) -> str | None:
    o = ord(ch)
    for lo, hi, name in _BLOCKS:
        if lo <= o <= hi:
            return name
    return None


def detect_script(text: str, sample: int = 4000) -> tuple[str, Counter]:
    """(dominant script or 'Zyyy' when there are no letters, letter counts per script) over the first `sample` chars."""
    counts: Counter = Counter()
    for ch in text[:sample]:
        if ch.isalpha() or unicodedata.category(ch) in ("Mn", "Mc"):
            s = _script_of(ch)
            if s:
                counts[s] += 1
    return (counts.most_common(1)[0][0] if counts else "Zyyy"), counts


@dataclass(slots=True)
class LangResult:
    lang: str
    """ISO 639-1 code (cld2/langid), `hi-Latn` for romanized Hindi, `un` when unknown."""
    script: str
    confidence: float
    code_mixed: bool = False
    hindi_word_share: float | None = None


def _cld2(text: str):
    try:
        import pycld2
    except ImportError as e:
        raise CptError("stage langid needs the indic extra: pip install 'cpt-megatron[indic]' (pycld2, langid)") from e
    try:
        reliable, _, details = pycld2.detect(text[:20000])
    except pycld2.error:  # invalid UTF-8 (lone surrogates) in exotic input
        reliable, details = False, [("", "un", 0, 0.0)]
    return reliable, details[0][1], details[0][2] / 100.0


def _langid(text: str) -> tuple[str, float]:
    import langid

    lang, _ = langid.classify(text[:5000])
    return lang, 0.5


def identify(text: str, cfg: LangIdConfig | None = None) -> LangResult:
    cfg = cfg or LangIdConfig()
    script, counts = detect_script(text)
    total = sum(counts.values())
    if script == "Latn":
        from cpt_megatron.curate.romanized import load_classifier

        mean, share, n = load_classifier().analyze(text)
        mixed = n >= 4 and cfg.code_mixed_min <= share <= 1 - cfg.code_mixed_min
        if mean > 0:
            return LangResult("hi-Latn", script, round(min(1.0, share), 3), mixed, round(share, 3))
        reliable, lang, conf = _cld2(text)
        if lang in ("un", "sa", "hi") or not reliable:  # cld2 is unsure or confuses Roman Hindi
            lang = "en" if share < 0.5 else "hi-Latn"
        return LangResult(lang, script, round(conf if reliable else 0.5, 3), mixed, round(share, 3))
    reliable, lang, conf = _cld2(text)
    if not reliable or lang == "un":
        lang, conf = _langid(text)
    # A second script holding >= 20% of letters (e.g. Devanagari with English phrases) is code-mixing.
    mixed = total > 0 and len(counts) > 1 and counts.most_common(2)[1][1] / total >= 0.2
    return LangResult(lang, script, round(conf, 3), mixed)
