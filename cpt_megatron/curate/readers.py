"""Streaming readers: JSONL (.jsonl/.gz/.zst), Parquet, plain text with a separator regex, directories.

Every record is either a `Doc` (text, id, source, position) or a `Malformed` (source, line, reason):
bad lines are reported, never dropped silently and never fatal. Text that is not valid Unicode is malformed
wherever it comes from: undecodable bytes (e.g. a Latin-1 .txt; a plain-text document is malformed at its
first bad line) and lone surrogates (`"\\ud800"` is valid JSON but no UTF-8 encoder accepts it).
`position` is the 1-based line of the document's first line (JSONL, plain text) or the 0-based row (Parquet);
0 for one-document files.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cpt_megatron.curate.config import InputConfig
from cpt_megatron.errors import CptError
from cpt_megatron.utils import binary_kind, check_text_file, lone_surrogate

__all__ = ["Doc", "FilePart", "Malformed", "DocumentReader", "read_documents", "is_plain_text", "splittable"]


@dataclass(slots=True)
class Doc:
    text: str
    id: str
    source: str
    position: int
    bad_bytes: int = 0
    """Always 0: undecodable input is Malformed (kept for callers that still add it to their counts)."""


@dataclass(slots=True)
class Malformed:
    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")


@dataclass(frozen=True)
class FilePart:
    """The records of an uncompressed file that START in bytes [lo, hi): one task's share of a file too
    big for one task. JSONL: the lines starting in it; plain text split by `input.doc_separator`: the
    documents whose first line starts in it (the last one read to its end, past hi). Line numbers, hence
    positions and ids, are those of the whole file."""

    path: Path
    lo: int
    hi: int
    first_line: int | None = None
    """The line number of the first line starting at or after lo, when the caller counted it (else the
    reader counts the newlines before lo: a sequential read)."""

    @property
    def name(self) -> str:
        return self.path.name

    def stat(self):
        return self.path.stat()

    def __str__(self) -> str:
        return f"{self.path}[{self.lo}:{self.hi}]"


def splittable(path: Path, separated: bool = False) -> bool:
    """An input whose documents can be split across tasks by byte range: uncompressed JSONL, and (with
    `separated`: `input.doc_separator` is set) uncompressed plain text."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return True
    return separated and _kind(path) == "text" and not name.endswith((".gz", ".zst"))


def _newlines_before(path: Path, end: int, chunk: int = 1 << 24) -> int:
    n, done = 0, 0
    with open(path, "rb") as f:
        while done < end:
            b = f.read(min(chunk, end - done))
            if not b:
                break
            n += b.count(b"\n")
            done += len(b)
    return n


def _seek_line(raw, path: Path, lo: int, first_line: int | None = None) -> tuple[int, int]:
    """Position `raw` at the first line starting at or after byte lo: (its 1-based line number, its byte)."""
    if lo <= 0:
        return 1, 0
    raw.seek(lo - 1)  # skip the rest of the line byte lo - 1 belongs to
    at = lo - 1 + len(raw.readline())
    return (first_line if first_line is not None else 1 + _newlines_before(path, at)), at


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def is_plain_text(path: str | os.PathLike) -> bool:
    """True for an input file read as plain text (not JSONL/Parquet by its name)."""
    p = Path(path)
    if not (p.is_file() and _kind(p) == "text"):
        return False
    with open(p, "rb") as f:  # an archive or image is refused by the reader, not read as text
        return binary_kind(f.read(8192)) is None


def _open_binary(path: Path):
    name = path.name.lower()
    raw = open(path, "rb")
    if name.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        import zstandard

        return raw, io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw, raw


class DocumentReader:
    """Iterate the documents of several inputs in a fixed order; `bytes_done()` drives the progress ETA."""

    def __init__(self, inputs: list[str | os.PathLike], config: InputConfig | None = None):
        self.config = config or InputConfig()
        self.files = self._expand(inputs)
        self.total_bytes = sum((p.hi - p.lo) if isinstance(p, FilePart) else p.stat().st_size for p in self.files)
        self._done_bytes = 0
        self._raw = None
        self._sep = re.compile(self.config.doc_separator) if self.config.doc_separator else None

    def _expand(self, inputs) -> list[Path]:
        files: list[Path] = []
        for spec in inputs:
            if isinstance(spec, FilePart):
                files.append(spec)
                continue
            p = Path(spec)
            if p.is_dir():
                found = sorted(
                    f for f in p.glob(self.config.glob) if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)
                )
                if not found:
                    raise CptError(f"input directory {p} has no files matching {self.config.glob!r}")
                files.extend(found)
            elif p.is_file():
                if p.stat().st_size == 0:
                    raise CptError(f"input {p} is empty: nothing to curate; check the file (or drop it from the inputs)")
                files.append(p)
            else:
                raise CptError(f"input {spec} not found (give JSONL/Parquet/text files or directories)")
        for f in files:  # binary files (images, archives) are refused up front, not curated as text
            if not isinstance(f, FilePart) and _kind(f) != "parquet" and not f.name.lower().endswith((".gz", ".zst")):
                check_text_file(f, "input", hint="give JSONL/Parquet/text files (set input.glob to skip "
                                "other files of a directory)")
        return files

    def bytes_done(self) -> int:
        try:
            return self._done_bytes + (self._raw.tell() if self._raw is not None and not self._raw.closed else 0)
        except (OSError, ValueError):
            return self._done_bytes

    def __iter__(self) -> Iterator[Doc | Malformed]:
        if self.config.max_docs is None:
            yield from self._records()
            return
        n = 0
        for rec in self._records():  # closing the generator closes the file it was reading
            yield rec
            n += isinstance(rec, Doc)
            if n >= self.config.max_docs:
                return

    def units(self, part_bytes: int) -> Iterator[Doc | Malformed | FilePart]:
        """The inputs in order as records, except that each file a worker can read by byte range
        (`splittable`) comes as `FilePart`s of about `part_bytes` ending at line ends, their first line
        numbers counted here (one sequential read): the caller hands the parts to worker processes.
        With `max_docs` set everything comes as records."""
        if self.config.max_docs is not None:
            yield from self
            return
        for path in self.files:
            if isinstance(path, FilePart) or not splittable(path, self._sep is not None):
                yield from self._records_of(path)
                continue
            with open(path, "rb") as f:
                lo, line = 0, 1
                while chunk := f.read(part_bytes):
                    chunk += f.readline()  # end at a line end
                    yield FilePart(path, lo, lo + len(chunk), line)
                    lo, line = lo + len(chunk), line + chunk.count(b"\n")
                    self._done_bytes += len(chunk)

    def _records(self) -> Iterator[Doc | Malformed]:
        for path in self.files:
            yield from self._records_of(path)

    def _records_of(self, path) -> Iterator[Doc | Malformed]:
        if isinstance(path, FilePart):
            if _kind(path.path) == "jsonl":
                yield from self._jsonl(path.path, path.lo, path.hi, path.first_line)
            else:
                yield from self._separated(path.path, path.lo, path.hi, path.first_line)
            self._done_bytes += path.hi - path.lo
        else:
            kind = _kind(path)
            if kind == "jsonl":
                yield from self._jsonl(path)
            elif kind == "parquet":
                yield from self._parquet(path)
            elif self._sep is not None:
                yield from self._separated(path)
            else:
                yield from self._whole(path)
            self._done_bytes += path.stat().st_size
        self._raw = None

    def _jsonl(self, path: Path, lo: int = 0, hi: int | None = None, first_line: int | None = None
               ) -> Iterator[Doc | Malformed]:
        """The records of `path`, or (uncompressed files) those of the lines starting in bytes [lo, hi)."""
        src, tf, idf = str(path), self.config.text_field, self.config.id_field
        raw, f = _open_binary(path)
        self._raw = raw
        first, at = _seek_line(raw, path, lo, first_line)
        with raw, f:
            for lineno, line in enumerate(f, first):
                if hi is not None:
                    if at >= hi:
                        break
                    at += len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield Malformed(src, lineno, f"undecodable bytes ({e.reason} at byte {e.start})")
                    continue
                except json.JSONDecodeError as e:
                    yield Malformed(src, lineno, f"bad JSON ({e.msg})")
                    continue
                if not isinstance(obj, dict):
                    yield Malformed(src, lineno, f"expected a JSON object, found {type(obj).__name__}")
                    continue
                text = obj.get(tf)
                if not isinstance(text, str):
                    why = "missing" if text is None else f"not a string ({type(text).__name__})"
                    yield Malformed(src, lineno, f"field {tf!r} {why}")
                    continue
                if b"\\u" in line and (bad := lone_surrogate(text)) is not None:  # only an escape makes one
                    yield Malformed(src, lineno, f"field {tf!r} holds a lone surrogate "
                                                 f"(U+{ord(text[bad]):04X} at character {bad})")
                    continue
                doc_id = obj.get(idf)
                yield Doc(text, str(doc_id) if doc_id is not None else f"{path.name}:{lineno}", src, lineno)

    def _parquet(self, path: Path) -> Iterator[Doc | Malformed]:
        import pyarrow.parquet as pq

        src, tf, idf = str(path), self.config.text_field, self.config.id_field
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if tf not in names:
            yield Malformed(src, 0, f"parquet has no column {tf!r} (columns: {names})")
            return
        cols = [tf] + ([idf] if idf in names else [])
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=cols):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                if not isinstance(text, str):
                    yield Malformed(src, row, f"row {row}: column {tf!r} is {'null' if text is None else type(text).__name__}")
                else:
                    yield Doc(text, str(doc_id) if doc_id is not None else f"{path.name}:{row}", src, row)
                row += 1

    @staticmethod
    def _undecodable(e: UnicodeDecodeError, data: bytes, first_line: int) -> tuple[int, str]:
        """(line, reason) of the first undecodable byte."""
        nl = b"\n"
        col = e.start - data.rfind(nl, 0, e.start) - 1
        return (first_line + data.count(nl, 0, e.start),
                f"undecodable bytes (not UTF-8: {e.reason} at byte {col} of the line); convert the file to UTF-8")

    def _separated(self, path: Path, lo: int = 0, hi: int | None = None, first_line: int | None = None
                   ) -> Iterator[Doc | Malformed]:
        """The documents of `path`, or (uncompressed files) those whose first line starts in bytes [lo, hi):
        a range after the first skips the lines before its first separator line (the end of a document
        that started earlier) and reads its last document to its end."""
        src = str(path)
        if hi is not None and hi <= lo:
            return
        raw, f = _open_binary(path)
        self._raw = raw
        first, at = _seek_line(raw, path, lo, first_line)
        inside = lo == 0  # in a document that starts in the range (the text before the first separator too)
        lines: list[str] = []
        start, bad = 0, None  # bad: the document's first undecodable line, as a Malformed

        def flush():
            if bad is not None:
                return bad
            text = "".join(lines)
            return Doc(text, f"{path.name}:{start}", src, start) if text.strip() else None

        with raw, f:
            for lineno, bline in enumerate(f, first):
                line_at, at = at, at + len(bline)
                line_bad = None
                try:
                    line = bline.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = bline.decode("utf-8", errors="replace")  # still split on separators
                    line_bad = Malformed(src, *self._undecodable(e, bline, lineno))
                if self._sep.search(line.rstrip("\r\n")):
                    if lines and (d := flush()) is not None:
                        yield d
                    if hi is not None and line_at >= hi:  # the next document starts in the next range
                        return
                    inside = True
                    lines, start, bad = [], lineno, line_bad
                elif not inside:  # the end of a document that started before lo
                    if hi is not None and line_at >= hi:
                        return
                    continue
                else:
                    if not lines and start == 0:
                        start = lineno  # text before the first separator is a document too
                    bad = bad or line_bad
                lines.append(line)
            if lines and (d := flush()) is not None:
                yield d

    def _whole(self, path: Path) -> Iterator[Doc | Malformed]:
        raw, f = _open_binary(path)
        self._raw = raw
        with raw, f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Malformed(str(path), *self._undecodable(e, data, 1))
            return
        if text.strip():
            yield Doc(text, path.name, str(path), 0)
        else:
            yield Malformed(str(path), 0, "empty file")


def read_documents(inputs: list[str | os.PathLike], config: InputConfig | None = None) -> Iterator[Doc | Malformed]:
    """All documents and malformed records of `inputs`, in input order."""
    return iter(DocumentReader(inputs, config))
