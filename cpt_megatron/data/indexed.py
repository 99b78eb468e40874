"""Megatron indexed datasets (`PREFIX.bin` / `PREFIX.idx`) written and merged by streaming.

Byte-compatible with megatron-core 0.16.1 `IndexedDatasetBuilder` (see notes §1): `.idx` = magic
`MMIDIDX\\0\\0`, version 1 (<Q), dtype code (<B), sequence count (<Q), document count (<Q, = docs + 1),
int32 lengths[S], int64 byte pointers[S], int64 document indices[D]. `.bin` = raw tokens.

Why not `IndexedDatasetBuilder`: it keeps every length and pointer in Python lists until `finalize`
(the cause of Megatron-LM's preprocessing OOMs, #154/#444). Here lengths and document boundaries are
buffered in numpy chunks and spilled to temp files, pointers are computed chunk by chunk while the
`.idx` is written, and `add_index` merges another dataset through a memory map, so RSS stays flat
however large the corpus. Output goes to temp files renamed into place by `finalize`: an interrupted
run never leaves a half-written `.bin`/`.idx` under the final name.

Numpy only; no torch or megatron import.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import sys
from glob import escape as glob_escape
from pathlib import Path

import numpy as np

from cpt_megatron.errors import CptError

__all__ = [
    "DTYPE_CODES",
    "optimal_dtype",
    "IndexWriter",
    "IndexArrays",
    "read_index",
    "merge_datasets",
    "dataset_exists",
]

_HEADER = b"MMIDIDX\x00\x00"
_HEADER_SIZE = 34
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8,
}
_CODE_TO_DTYPE = {v: k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # entries per numpy chunk (4-8 MiB): the bound on index memory


def optimal_dtype(vocab_size: int | None) -> type:
    """Same rule as megatron's `DType.optimal_dtype`: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


class IndexArrays:
    """Memory-mapped view of an `.idx`: dtype, lengths, pointers, document indices (no copies)."""

    def __init__(self, prefix: str | os.PathLike):
        path = f"{prefix}.idx"
        with open(path, "rb") as f:
            head = f.read(_HEADER_SIZE)
        if len(head) < _HEADER_SIZE or head[:9] != _HEADER:
            raise CptError(f"{path} is not a Megatron indexed dataset index (bad magic)")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise CptError(f"{path}: unsupported index version {version} (expected 1)")
        code = head[17]
        if code not in _CODE_TO_DTYPE:
            raise CptError(f"{path}: unknown dtype code {code}")
        self.dtype = _CODE_TO_DTYPE[code]
        self.sequence_count, self.document_count = struct.unpack("<QQ", head[18:34])
        s, d = self.sequence_count, self.document_count
        want, have = _HEADER_SIZE + 12 * s + 8 * d, os.path.getsize(path)
        if have != want:
            raise CptError(f"{path} is {'truncated' if have < want else 'too long'}: its header says {s} sequences "
                           f"and {d - 1} documents ({want:,} bytes), the file has {have:,} bytes; re-run "
                           "`cpt preprocess` for this dataset (an interrupted copy or write leaves this)")
        mm = np.memmap(path, mode="r", dtype=np.uint8)
        off = _HEADER_SIZE
        self.lengths = mm[off : off + 4 * s].view(np.int32)
        off += 4 * s
        self.pointers = mm[off : off + 8 * s].view(np.int64)
        off += 8 * s
        self.document_indices = mm[off : off + 8 * d].view(np.int64)
        bin_path = f"{prefix}.bin"
        if s and os.path.isfile(bin_path):
            need = int(self.pointers[-1]) + int(self.lengths[-1]) * np.dtype(self.dtype).itemsize
            if os.path.getsize(bin_path) < need:
                raise CptError(f"{bin_path} is truncated: {prefix}.idx needs {need:,} bytes, the file has "
                               f"{os.path.getsize(bin_path):,}; re-run `cpt preprocess` for this dataset")

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64)) if self.sequence_count else 0


def read_index(prefix: str | os.PathLike) -> IndexArrays:
    return IndexArrays(prefix)


class _Spill:
    """An append-only numpy array held in chunks and spilled to a temp file past `_CHUNK` entries."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.spilled = 0
        self.f = None

    def append(self, arr: np.ndarray) -> None:
        if len(arr) == 0:
            return
        self.buf.append(np.ascontiguousarray(arr, dtype=self.dtype))
        self.buffered += len(arr)
        if self.buffered >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.buf:
            return
        if self.f is None:
            self.f = open(self.path, "wb", buffering=0)
        for a in self.buf:
            _tofile(a, self.f, self.path)
        self.spilled += self.buffered
        self.buf, self.buffered = [], 0

    def __len__(self) -> int:
        return self.spilled + self.buffered

    def chunks(self):
        """Yield the whole array in order, chunk by chunk (reads the spill file back)."""
        if self.f is not None:
            self.f.flush()
            with open(self.path, "rb") as f:
                while True:
                    a = np.fromfile(f, dtype=self.dtype, count=_CHUNK)
                    if len(a) == 0:
                        break
                    yield a
        yield from self.buf

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _tofile(arr: np.ndarray, f, path: str) -> None:
    """arr.tofile(f), but a full disk is an OSError naming `path` with its errno (numpy's own says only
    '285060 requested and 182272 written'): raw writes, short ones retried until the kernel says why."""
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    while len(view):
        try:
            n = f.write(view)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from e
        if not n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        view = view[n:]


def _remove_dead_temps(prefix: str) -> None:
    """Temp files a killed writer of `prefix` left behind (PREFIX.bin.tmp<pid> etc. of a pid that is gone)."""
    import re

    from cpt_megatron.utils import pid_alive

    p = Path(prefix)
    pat = re.compile(re.escape(p.name) + r"\.(bin|idx|len|doc)\.tmp(\d+)$")
    for f in p.parent.glob(f"{glob_escape(p.name)}.*.tmp*"):
        m = pat.match(f.name)
        if m and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                print(f"cpt: removed stale {f} (left by pid {m.group(2)}, no longer running)", file=sys.stderr,
                      flush=True)


class IndexWriter:
    """Streaming writer for one `PREFIX.bin/.idx` pair; each document is one sequence.

    Use as a context manager: on an exception the temp files are removed and nothing appears under
    `PREFIX`. `finalize()` writes the `.idx` and renames both files into place.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise CptError(f"unsupported token dtype {dtype}")
        self.itemsize = np.dtype(self.dtype).itemsize
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(self.prefix)
        tag = f".tmp{os.getpid()}"
        self._bin_tmp = f"{self.prefix}.bin{tag}"
        self._idx_tmp = f"{self.prefix}.idx{tag}"
        self._bin = open(self._bin_tmp, "wb", buffering=0)  # raw: tell() stays true after copy_file_range
        self._lengths = _Spill(f"{self.prefix}.len{tag}", np.int32)
        self._doc_ends = _Spill(f"{self.prefix}.doc{tag}", np.int64)  # document_indices[1:]
        self.num_tokens = 0
        self.max_token_id = -1
        self._done = False

    # -- adding data -------------------------------------------------------------------------------
    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents whose tokens are concatenated in `tokens`.

        A length of 0 is an empty document: a document boundary with no sequence, exactly what
        Megatron's `IndexedDatasetBuilder.add_document([], [])` writes (`document_indices` repeats).
        """
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            return
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        if int(lengths.sum()) != len(tokens):
            raise CptError("lengths do not add up to the number of tokens")
        _tofile(tokens, self._bin, self._bin_tmp)
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        start = len(self._lengths)
        nonempty = lengths > 0
        self._lengths.append(lengths[nonempty].astype(np.int32))
        self._doc_ends.append(start + np.cumsum(nonempty, dtype=np.int64))
        self.num_tokens += len(tokens)

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        self.add_documents(tokens, np.array([len(tokens)]))

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append another indexed dataset (any number of sequences per document) by streaming."""
        src = IndexArrays(prefix)
        if src.dtype != self.dtype:
            raise CptError(f"{prefix}: dtype {src.dtype.__name__} differs from {self.dtype.__name__}")
        offset = len(self._lengths)
        for i in range(0, src.sequence_count, _CHUNK):
            self._lengths.append(np.asarray(src.lengths[i : i + _CHUNK]))
        di = src.document_indices
        for i in range(1, src.document_count, _CHUNK):
            self._doc_ends.append(np.asarray(di[i : i + _CHUNK]) + offset)
        self._bin.flush()
        with open(f"{prefix}.bin", "rb") as f:
            try:
                _copy_file(f, self._bin)
            except OSError as e:  # a full disk: name the file being written
                raise OSError(e.errno, e.strerror, self._bin_tmp) from e
        self.num_tokens += src.num_tokens

    # -- finishing ---------------------------------------------------------------------------------
    def finalize(self) -> dict:
        """Write the `.idx`, rename `.bin` and `.idx` into place; return counts."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        n_seq, n_doc = len(self._lengths), len(self._doc_ends) + 1
        with open(self._idx_tmp, "wb", buffering=0) as f:
            head = _HEADER + struct.pack("<QBQQ", 1, DTYPE_CODES[self.dtype], n_seq, n_doc)
            _tofile(np.frombuffer(head, np.uint8), f, self._idx_tmp)
            for chunk in self._lengths.chunks():
                _tofile(chunk, f, self._idx_tmp)
            running = 0
            for chunk in self._lengths.chunks():  # byte pointers = exclusive cumsum of lengths*itemsize
                nbytes = chunk.astype(np.int64) * self.itemsize
                ptr = np.cumsum(nbytes) - nbytes + running
                _tofile(ptr, f, self._idx_tmp)
                running += int(nbytes.sum())
            _tofile(np.zeros(1, dtype=np.int64), f, self._idx_tmp)
            for chunk in self._doc_ends.chunks():
                _tofile(chunk, f, self._idx_tmp)
            os.fsync(f.fileno())
        self._lengths.close()
        self._doc_ends.close()
        # .idx last: a reader only opens a prefix whose .idx exists, so a crash between the two
        # renames leaves an orphan .bin, never a readable half dataset.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.prefix}.idx")
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(self._idx_tmp, f"{self.prefix}.idx")
        self._done = True
        return {"sequences": n_seq, "documents": n_doc - 1, "tokens": self.num_tokens}

    def abort(self) -> None:
        if self._done:
            return
        with contextlib.suppress(Exception):
            self._bin.close()
        self._lengths.close()
        self._doc_ends.close()
        for p in (self._bin_tmp, self._idx_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        self._done = True

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def _copy_file(src, dst) -> None:
    """Kernel-side copy when possible (copy_file_range), else buffered."""
    try:
        n_total = os.fstat(src.fileno()).st_size
        while n_total > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(n_total, 1 << 30))
            if n == 0:
                break
            n_total -= n
        if n_total == 0:
            return
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
    except AttributeError:
        pass
    shutil.copyfileobj(src, dst, 1 << 22)


def merge_datasets(prefixes: list[str], out_prefix: str) -> dict:
    """Concatenate indexed datasets (same dtype) into `out_prefix` without loading them."""
    if not prefixes:
        raise CptError("nothing to merge")
    dtype = IndexArrays(prefixes[0]).dtype
    with IndexWriter(out_prefix, dtype) as w:
        for p in prefixes:
            w.add_index(p)
        return w.finalize()
