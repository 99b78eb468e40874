"""Text normalization: NFC, control/invisible characters, whitespace, and the Indic options.

`normalize_text` returns the new text and a Counter of what changed (summed into report.json), so a
user can see e.g. how many precomposed nukta letters or stray zero-width joiners a corpus had.

Indic policy (with `indic=True`), stated once here:
- Nukta: the canonical form is Unicode's (NFC): the letters Unicode excludes from composition
  (Devanagari U+0958-095F, Bengali U+09DC/09DD/09DF, Gurmukhi U+0A33/0A36/0A59-0A5E, Odia U+0B5C/0B5D)
  become base + nukta; a nukta typed after a vowel sign is moved before it, and doubled nuktas collapse.
- ZWJ/ZWNJ (`zero_width`): `virama` keeps them only right after a virama, where they choose a half form
  or an explicit virama; elsewhere they are invisible noise and are removed. `keep` / `strip` as named.
- Danda (`danda`): `unicode` turns ASCII '|'/'||' after Indic text into U+0964/U+0965; `ascii` turns
  dandas into '.'. Digits (`digits`): `ascii` maps the Indic digits of every script to 0-9.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from cpt_megatron.curate.config import NormalizeConfig

__all__ = ["normalize_text", "NUKTA_PRECOMPOSED"]

# Precomposed nukta letters that NFC decomposes (composition exclusions).
NUKTA_PRECOMPOSED = frozenset(
    "\u0958\u0959\u095a\u095b\u095c\u095d\u095e\u095f"  # Devanagari qa..yya
    "\u09dc\u09dd\u09df"  # Bengali rra, rha, yya
    "\u0a33\u0a36\u0a59\u0a5a\u0a5b\u0a5e"  # Gurmukhi lla, sha, khha, ghha, za, fa
    "\u0b5c\u0b5d"  # Odia rra, rha
)
_NUKTAS = "\u093c\u09bc\u0a3c\u0abc\u0b3c\u0cbc"
_VIRAMAS = "\u094d\u09cd\u0a4d\u0acd\u0b4d\u0bcd\u0c4d\u0ccd\u0d4d"
# Dependent vowel signs (matras) of the Brahmic blocks U+0900-0D7F.
_MATRA = "[\u093e-\u094c\u09be-\u09cc\u0a3e-\u0a4c\u0abe-\u0acc\u0b3e-\u0b4c\u0c3e-\u0c4c\u0cbe-\u0ccc\u0d3e-\u0d4c]"
_NUKTA_AFTER_MATRA = re.compile(f"({_MATRA})([{_NUKTAS}])")
_DOUBLE_NUKTA = re.compile(f"([{_NUKTAS}])\\1+")
_ZW = re.compile("[\u200c\u200d]")
_ZW_NOT_AFTER_VIRAMA = re.compile(f"(?<![{_VIRAMAS}])[\u200c\u200d]+")
_PIPE_DANDA = re.compile("(?<=[\u0900-\u0d7f])( ?)(\\|\\|?)(?!\\|)")
_DANDAS = re.compile("[\u0964\u0965]")
# Indic digit blocks: Devanagari 0966, Bengali 09E6, Gurmukhi 0A66, Gujarati 0AE6, Odia 0B66,
# Tamil 0BE6, Telugu 0C66, Kannada 0CE6, Malayalam 0D66.
_DIGIT_TABLE = {base + i: str(i) for base in (0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66) for i in range(10)}
_DIGITS = re.compile("[" + "".join(chr(c) for c in _DIGIT_TABLE) + "]")

# C0/C1 controls except \t \n, plus invisible format characters that carry no meaning in running text.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff\u00ad\u200e\u200f\u202a-\u202e]")
_ODD_SPACE = "\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_HSPACE = re.compile(f"[ {_ODD_SPACE}]*[{_ODD_SPACE}][ {_ODD_SPACE}]*| {{2,}}")  # only runs that change
_TRAIL = re.compile(" +\n| +$|^ +", re.M)
_BLANKS = re.compile("\n{3,}")


def normalize_text(text: str, cfg: NormalizeConfig | None = None) -> tuple[str, Counter]:
    """Normalized `text` and a Counter of changes by kind (only non-zero kinds appear)."""
    cfg = cfg or NormalizeConfig()
    changes: Counter = Counter()
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.nfc:
        if cfg.indic:
            n = sum(1 for ch in text if ch in NUKTA_PRECOMPOSED)
            if n:
                changes["nukta_precomposed"] += n
        nfc = unicodedata.normalize("NFC", text)
        if nfc != text:
            changes["nfc"] += 1
            text = nfc
    if cfg.strip_control:
        text, n = _CONTROL.subn("", text)
        changes["control_chars"] += n
    if cfg.indic:
        text = _normalize_indic(text, cfg, changes)
    if cfg.whitespace:
        text, n = _HSPACE.subn(" ", text)
        changes["whitespace_runs"] += n
        text, n = _TRAIL.subn(lambda m: "\n" if m.group(0).endswith("\n") else "", text)
        changes["trailing_spaces"] += n
        text, n = _BLANKS.subn("\n\n", text)
        changes["blank_lines"] += n
        text = text.strip()
    return text, +changes


def _normalize_indic(text: str, cfg: NormalizeConfig, changes: Counter) -> str:
    if not any("\u0900" <= ch <= "\u0d7f" for ch in text) and "\u200c" not in text and "\u200d" not in text:
        return text
    text, n = _NUKTA_AFTER_MATRA.subn(r"\2\1", text)
    changes["nukta_reordered"] += n
    text, n = _DOUBLE_NUKTA.subn(r"\1", text)
    changes["nukta_doubled"] += n
    if cfg.zero_width == "strip":
        text, n = _ZW.subn("", text)
        changes["zero_width_removed"] += n
    elif cfg.zero_width == "virama":
        text, n = _ZW_NOT_AFTER_VIRAMA.subn("", text)
        changes["zero_width_removed"] += n
    if cfg.danda == "unicode":
        text, n = _PIPE_DANDA.subn(lambda m: m.group(1) + ("\u0965" if len(m.group(2)) == 2 else "\u0964"), text)
        changes["danda_from_pipe"] += n
    elif cfg.danda == "ascii":
        text, n = _DANDAS.subn(".", text)
        changes["danda_to_ascii"] += n
    if cfg.digits == "ascii":
        text, n = _DIGITS.subn(lambda m: _DIGIT_TABLE[ord(m.group(0))], text)
        changes["indic_digits"] += n
    return text
