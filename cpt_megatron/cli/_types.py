"""argparse `type=` functions shared by every command: bad values fail at parse time with one line.

`-1`, `-1e9` and `-5GB` reach these functions (not "expected one argument") because `CptArgumentParser`
treats any `-<digit>...` token as a value, so the message can say what is allowed.
"""

from __future__ import annotations

import argparse
import re

__all__ = ["CptArgumentParser", "positive_int", "nonneg_int", "positive_float", "nonneg_float", "token_count",
           "byte_size", "tokenizer_spec"]


class CptArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose negative-number detection covers -1e9 and -5GB (no cpt flag starts with a digit)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d)[\w.+-]*$")


def _number(text: str, kind):
    try:
        return kind(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    n = _number(text, int)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text}")
    return n


def nonneg_int(text: str) -> int:
    n = _number(text, int)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return n


def positive_float(text: str) -> float:
    x = _number(text, float)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return x


def nonneg_float(text: str) -> float:
    x = _number(text, float)
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return x


def token_count(text: str) -> float:
    """A positive token count: 100e9, 1_000_000, 2.5e12."""
    x = _number(text, float)
    if not x >= 1 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive token count like 100e9, got {text}")
    return x


def byte_size(text: str) -> int:
    """A positive size in bytes: 5GB, 500MB, 2GiB, 1e9."""
    from cpt_megatron.errors import CptError
    from cpt_megatron.utils import parse_size

    try:
        return parse_size(text, what="size")
    except CptError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size").strip(": ")) from None


def tokenizer_spec(text: str) -> str:
    """A `--tokenizer` value: a path as given, or a shortcut (`@gpt2`, `@smollm2`) resolved to its local path by
    the one resolver recipes use (tokenizer/load.py `resolve_spec`)."""
    from cpt_megatron.errors import CptError
    from cpt_megatron.tokenizer.load import resolve_spec

    try:
        return resolve_spec(text)
    except CptError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
