"""Held-out general evaluation sets must be text no training source contains: the overlap check.

A held-out set (`eval.general`) is refused when it
- is the same file as a training input (same path, inside an input folder, or byte-identical content), or
- shares text with a training source: more than `max_overlap` (default 1%) of its distinct word 13-grams
  also occur in the text the run trains on (the curated shards of every `inputs` source).

Words: Unicode NFKC, case-folded, split on every run of non-alphanumeric characters (so WikiText's `@-@`,
tokenized Gutenberg's ` , ` and raw text compare equal). 13-grams are the unit of GPT-3's and lm-eval's
decontamination: long enough that common phrases do not match, short enough that one changed word (an
`<unk>`) leaves most of a paragraph's 13-grams intact. 13-grams are sampled by hash (1 in `SAMPLE`, the
same ones on both sides, so the shared fraction is an unbiased estimate): the held-out sets' samples are
held in memory, the training text is streamed once; the cost is one read of the curated corpus.
Preprocessed `prefix` sources carry only tokens: they are not checked (reported as such).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = ["NGRAM", "SAMPLE", "words", "ngram_hashes", "heldout_hashes", "same_file", "overlap_report",
           "check_heldout"]

NGRAM = 13
SAMPLE = 4
_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


def ngram_hashes(texts: Iterable[str], n: int = NGRAM, sample: int = SAMPLE) -> Iterator[int]:
    """Hashes of the sampled word n-grams of each text (a text shorter than n words is one n-gram)."""
    for text in texts:
        ws = words(text)
        for i in range(max(1, len(ws) - n + 1)):
            h = int.from_bytes(hashlib.blake2b(" ".join(ws[i:i + n]).encode(), digest_size=8).digest(), "little")
            if h % sample == 0:
                yield h


def _texts(path: Path, text_key: str = "text") -> Iterator[str]:
    """Documents of a .txt (whole file), .jsonl or .jsonl.gz (`text_key` per line) file, streamed."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield str(json.loads(line).get(text_key, ""))
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        buf = []
        for line in f:  # paragraphs (blank-line separated): n-grams span lines, not paragraphs
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf)
                buf = []
        if buf:
            yield "".join(buf)


def heldout_hashes(path: str | os.PathLike, text_key: str = "text") -> set[int]:
    return set(ngram_hashes(_texts(Path(path), text_key)))


def _files(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.is_file())
        elif p.is_file():
            yield p


def same_file(heldout: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path | None:
    """The training input that IS the held-out file (same path, or the same bytes), else None."""
    from cpt_megatron.utils import sha256_file

    h = Path(heldout).resolve()
    size, digest = h.stat().st_size, None
    for f in _files(inputs):
        if f.resolve() == h:
            return f
        if f.stat().st_size == size:
            digest = digest or sha256_file(h)
            if sha256_file(f) == digest:
                return f
    return None


def overlap_report(heldout: dict[str, tuple[str, str]], text: dict[str, list[str]],
                   inputs: dict[str, list[str]] | None = None) -> dict:
    """Held-out sets {name: (path, text_key)} against the training text {source: [files it trains on]} and
    raw inputs {source: [files/folders]} (same-file test): {set: {"path", "ngrams": distinct sampled 13-grams,
    "shared": {source: how many also there}, "same_file": {source: path}}}."""
    sets = {n: heldout_hashes(p, k) for n, (p, k) in heldout.items()}
    report = {n: {"path": str(heldout[n][0]), "ngrams": len(h), "shared": {}, "same_file": {}}
              for n, h in sets.items()}
    for src, files in (inputs or {}).items():
        for n in sets:
            f = same_file(heldout[n][0], files)
            if f is not None:
                report[n]["same_file"][src] = str(f)
    for src, files in text.items():
        seen: dict[str, set[int]] = {n: set() for n in sets}
        for path in _files(files):
            for h in ngram_hashes(_texts(path)):
                for n, hs in sets.items():
                    if h in hs:
                        seen[n].add(h)
        for n in sets:
            report[n]["shared"][src] = len(seen[n])
    return report


def check_heldout(report: dict, max_overlap: float, where: str = "eval.general") -> None:
    """One line for the first held-out set that is a training file or shares more than max_overlap of its 13-grams."""
    for n, r in report.items():
        for src, f in r["same_file"].items():
            raise CptError(f"{where}[{n}] {r['path']} is training source {src}'s input {f}: a held-out general set "
                           "must be text no training source contains; give another file or drop that source")
        for src, k in r["shared"].items():
            if r["ngrams"] and k / r["ngrams"] > max_overlap:
                raise CptError(f"{where}[{n}] {r['path']} shares {100 * k / r['ngrams']:.1f}% of its word 13-grams "
                               f"({k} of {r['ngrams']} sampled; eval.max_overlap={100 * max_overlap:g}%) with training "
                               f"source {src}: a held-out general set must be text no training source contains")
