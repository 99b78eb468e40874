"""PII redaction: typed placeholders (`<EMAIL>`, `<PHONE>`, ...) with counts per type.

Patterns are deliberately narrow so ordinary numbers, dates, prices and versions survive: phone numbers
need a `+` country code or the US (xxx) xxx-xxxx shape with separators, SSNs the dashed form, credit
cards a known issuer prefix plus a valid Luhn digit, Aadhaar numbers a valid Verhoeff digit.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

__all__ = ["PII_TYPES", "redact_pii", "luhn_valid", "verhoeff_valid"]

PII_TYPES = ("EMAIL", "PHONE", "IPV4", "IPV6", "CREDIT_CARD", "SSN", "AADHAAR", "PAN")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_AADHAAR = re.compile(r"(?<![\d-])(?<!\d[ -])[2-9]\d{3}([ -]?)\d{4}\1\d{4}(?![\d-]|[ -]\d)")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,5}(?![\w])"  # +CC ... (international)
    r"|(?<![\w(])\(\d{3}\) ?\d{3}[ .-]\d{4}(?!\w)"  # (555) 123-4567
    r"|(?<![\w.-])\d{3}([.-])\d{3}\1\d{4}(?![\w-]|\.\d)"  # 555-123-4567 / 555.123.4567
)
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
_PAN = re.compile(r"\b[A-Z]{3}[PCHFATBLJG][A-Z]\d{4}[A-Z]\b")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9])|35)")

# Verhoeff tables (dihedral group D5).
_VD = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]  # fmt: skip
_VP = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]  # fmt: skip


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def verhoeff_valid(digits: str) -> bool:
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VD[c][_VP[i % 8][int(ch)]]
    return c == 0


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def _card(m: re.Match) -> str | None:
    d = _digits(m.group(0))
    return "<CREDIT_CARD>" if 13 <= len(d) <= 19 and _CARD_PREFIX.match(d) and luhn_valid(d) else None


def _aadhaar(m: re.Match) -> str | None:
    return "<AADHAAR>" if verhoeff_valid(_digits(m.group(0))) else None


def _phone(m: re.Match) -> str | None:
    return "<PHONE>" if 7 <= len(_digits(m.group(0))) <= 15 else None


def _ipv6(m: re.Match) -> str | None:
    s = m.group(0)
    if s.count(":") < 2 or not any(c.isalnum() for c in s):
        return None
    try:
        ipaddress.IPv6Address(s.split("%")[0])
    except ValueError:
        return None
    # "12:30:00" is not an address (needs 8 groups or '::'); a bare "::" or "1::" is too weak to redact.
    return "<IPV6>" if sum(c.isalnum() for c in s) >= 4 else None


# Order matters: emails first (they contain digits and dots), long numbers before shorter shapes.
_RULES = (
    ("EMAIL", _EMAIL, lambda m: "<EMAIL>"),
    ("CREDIT_CARD", _CARD, _card),
    ("AADHAAR", _AADHAAR, _aadhaar),
    ("SSN", _SSN, lambda m: "<SSN>"),
    ("PHONE", _PHONE, _phone),
    ("IPV6", _IPV6, _ipv6),
    ("IPV4", _IPV4, lambda m: "<IPV4>"),
    ("PAN", _PAN, lambda m: "<PAN>"),
)


def redact_pii(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[str, Counter]:
    """`text` with PII replaced by `<TYPE>` placeholders, and the count per type."""
    counts: Counter = Counter()
    for name, pattern, decide in _RULES:
        if name not in types:
            continue

        def repl(m: re.Match, _name=name, _decide=decide) -> str:
            out = _decide(m)
            if out is None:
                return m.group(0)
            counts[_name] += 1
            return out

        text = pattern.sub(repl, text)
    return text, counts
