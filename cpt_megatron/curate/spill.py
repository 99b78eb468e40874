"""Bounded memory for curation: append-only arrays in nameless memory-mapped temp files, and the
in-memory budget they are released against.

A `SpillArray` lives in a temp file that is unlinked as soon as it is created (a killed run leaves
nothing behind). Its pages are the page cache's: writing and reading them costs no anonymous memory,
and `release()` drops the ones this process has mapped (madvise DONTNEED on a shared file mapping keeps
the data, in the file or the page cache, and takes it out of the process's resident set), so a
process's peak RSS stays near its budget however many documents it has indexed.

`SortedBands` is the near-dup index's LSH table on top of them: (band key, row) entries in one sorted
main run (spilled) plus a few small sorted runs of recent batches, merged into a new main run when they
outgrow their share of the budget (a streaming merge, `_MERGE_CHUNK` entries at a time).

`Budget` turns `CurateConfig.memory_mb` (peak RSS per process) into the sizes the pipeline works in.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from cpt_megatron.utils import equal_runs, gather_runs

__all__ = ["Budget", "SpillArray", "SpillBytes", "SortedBands", "map_sparse", "rss_mib", "sorted_lookup"]

_MIB = 1 << 20
# what a run adds beyond its working sizes: library code pages first run after the budget is set
# (measured 2.3 MiB of numpy, zlib, json) and the allocator's slack over the bytes it hands out (~3 MiB)
_SLACK = 4 * _MIB


def rss_mib() -> float:
    """This process's resident set (MiB) from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MIB
    except (OSError, ValueError, IndexError):
        return 0.0


def map_sparse(mm: mmap.mmap) -> None:
    """No readahead for this mapping (MADV_RANDOM): a touched page maps at most the kernel's fault-around
    window (64 KiB). Spilled data is read sparsely, and where the page cache holds large folios (ext4
    since Linux 6.16) a fault would otherwise map a whole folio into the resident set (measured: 212 KiB
    per sparse write fault)."""
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)


@dataclass(frozen=True)
class Budget:
    """The working sizes derived from a per-process peak-RSS budget (`memory_mb`, None: unbounded).

    work: what the run may hold beyond the interpreter and libraries (the budget minus the RSS when the
    run starts, the fixed allocations `reserve_bytes` and `_SLACK`; at least 8 MiB). Of it: text hashed in one numpy pass (`hash_bytes`; the pass and its
    cached power tables need ~70 bytes per text byte), text per batch sent to a worker (`batch_bytes`, 2 x workers batches in
    flight, each ~6x its text once hashed and sketched: short documents carry 2.5 KB of sketches), and the near-dup index's resident share (`index_bytes`: above it the mapped pages are
    released after every batch; its band table's recent runs are merged into the spilled main run)."""

    memory_mb: float | None
    work_bytes: int
    hash_bytes: int
    batch_bytes: int
    index_bytes: int

    @classmethod
    def of(cls, memory_mb: float | None, workers: int = 1, reserve_bytes: int = 0) -> Budget:
        """reserve_bytes: fixed allocations made later that the working sizes must leave room for."""
        if memory_mb is None:
            big = 1 << 62
            return cls(None, big, 8 * _MIB, big, big)
        work = max(int((memory_mb - rss_mib()) * _MIB) - reserve_bytes - _SLACK, 8 * _MIB)
        clamp = lambda v, lo, hi: int(min(max(v, lo), hi))  # noqa: E731
        return cls(memory_mb, work, clamp(work // 256, 32 << 10, 8 * _MIB),
                   clamp(work // (64 * max(workers, 1)), 64 << 10, 64 * _MIB), clamp(work // 8, 2 * _MIB, 1 << 40))


class SpillArray:
    """Append-only rows (`width` values of `dtype` each) in a nameless temp file, written with pwrite and
    read through a map (`view()`, the filled part, valid until the next `append`) or with pread
    (`read`); the capacity doubles as it grows (remapped O(log n) times)."""

    def __init__(self, dtype, width: int = 1, folder: str | None = None, capacity: int = 1024):
        self.dtype, self.width = np.dtype(dtype), int(width)
        fd, path = tempfile.mkstemp(prefix="cpt-spill-", suffix=".bin", dir=folder)
        self._file = os.fdopen(fd, "r+b")
        os.unlink(path)  # nameless from the start: nothing is left behind, even by a killed process
        self._n, self._cap, self._mm, self._arr = 0, 0, None, None
        self._grow(max(capacity, 1))

    def _row_bytes(self) -> int:
        return self.dtype.itemsize * self.width

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._cap)
        self._arr = None  # the old mapping closes when its last view goes
        self._file.truncate(cap * self._row_bytes())
        self._mm = mmap.mmap(self._file.fileno(), cap * self._row_bytes())
        map_sparse(self._mm)
        self._arr = np.frombuffer(self._mm, self.dtype).reshape(cap, self.width)
        self._cap = cap

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, self.dtype).reshape(-1, self.width)
        k = len(rows)
        if self._n + k > self._cap:
            self._grow(self._n + k)
        # written with pwrite, not through the map: the page cache takes the rows without a fault per
        # page, and none of them enters the resident set until it is read
        data = memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
        done, at = 0, self._n * self._row_bytes()
        while done < len(data):
            done += os.pwrite(self._file.fileno(), data[done:], at + done)
        self._n += k

    def view(self) -> np.ndarray:
        a = self._arr[: self._n]
        return a[:, 0] if self.width == 1 else a

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._n * self._row_bytes()

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) into `out` with pread: the page cache's pages, copied, never mapped (a
        mapped read maps its neighbours too: 64 KiB of fault-around per touched page)."""
        view = memoryview(out).cast("B")
        got, size, at = 0, (stop - start) * self._row_bytes(), start * self._row_bytes()
        while got < size:
            k = os.preadv(self._file.fileno(), [view[got:size]], at + got)
            if k <= 0:
                raise OSError(f"short read from a spill file ({got} of {size} bytes)")
            got += k

    def release(self) -> None:
        """Take the mapped pages out of this process's resident set (the data stays)."""
        if self._mm is not None and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._arr = self._mm = None
        self._file.close()


class SpillRuns:
    """Append-only variable-length runs of `dtype` values, back to back in one `SpillArray` with their
    offsets in another: run i is values()[offsets[i]:offsets[i+1]]."""

    def __init__(self, dtype, folder: str | None = None, capacity: int = 1 << 16):
        self._vals = SpillArray(dtype, 1, folder, capacity)
        self._offs = SpillArray(np.int64, 1, folder)
        self._offs.append(np.zeros(1, np.int64))

    def add_many(self, values: np.ndarray, lens) -> None:
        """Append len(lens) runs: values holds them back to back."""
        n = len(self._vals)
        self._vals.append(values)
        self._offs.append(n + np.cumsum(lens, dtype=np.int64))

    def values(self) -> np.ndarray:
        return self._vals.view()

    def offsets_array(self) -> np.ndarray:
        return self._offs.view()

    def run(self, i: int) -> np.ndarray:
        off = self._offs.view()
        return self._vals.view()[int(off[i]) : int(off[i + 1])]

    def __len__(self) -> int:
        return len(self._offs) - 1

    @property
    def nbytes(self) -> int:
        return self._vals.nbytes + self._offs.nbytes

    def release(self) -> None:
        self._vals.release()
        self._offs.release()

    def close(self) -> None:
        self._vals.close()
        self._offs.close()


class SpillBytes(SpillRuns):
    """Append-only byte strings (document keys), read back one at a time."""

    def __init__(self, folder: str | None = None):
        super().__init__(np.uint8, folder, 1 << 16)

    def extend(self, items: list[bytes]) -> None:
        if items:
            self.add_many(np.frombuffer(b"".join(items), np.uint8), [len(b) for b in items])

    def __getitem__(self, i: int) -> bytes:
        return self.run(i).tobytes()


_MERGE_CHUNK = 1 << 16  # entries of the older run merged per step at most (a 64th of `resident_bytes`)
_BLOCK = 512  # entries per block of a spilled run (4 KiB of keys): what a query reads
_READ_BLOCKS = 32  # needed blocks read per query step (256 KiB of keys and rows, up to 1 MiB with gaps)
_GAP_BLOCKS = 3


def sorted_lookup(keys: np.ndarray, rows: np.ndarray, uq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entries equal to each needle, their rows needle after needle) in a sorted run in memory; the
    needles sorted (repeats allowed)."""
    lo = np.searchsorted(keys, uq, "left")
    n = np.zeros(len(uq), np.int64)
    found = np.flatnonzero(keys[np.minimum(lo, len(keys) - 1)] == uq)  # most needles are in no run
    if len(found) == 0:
        return n, rows[:0]
    n[found] = np.searchsorted(keys, uq[found], "right") - lo[found]
    return n, gather_runs(rows, lo[found], n[found])


def _lookup_blocks(spill: tuple, fence: np.ndarray, uq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sorted_lookup` in a spilled run, reading only its blocks that can hold a needle: needle u's entries lie
    in blocks [b_lo, b_hi] (fence[b_lo] < u <= ... , fence[b_hi] <= u), contiguous, so the blocks read,
    in order, form a sorted array in which u's entries are as contiguous as in the run."""
    keys, rows = spill
    b_hi = np.searchsorted(fence, uq, "right") - 1  # -1: below the run's first key
    b_lo = np.maximum(np.searchsorted(fence, uq, "left") - 1, 0)
    live = np.flatnonzero(b_hi >= 0)
    n, got = np.zeros(len(uq), np.int64), []
    if len(live) == 0:
        return n, np.zeros(0, np.int64)
    b_lo, b_hi = b_lo[live], b_hi[live]
    # blocks each needle adds to those of the needles before it (b_lo, b_hi ascend with the needles)
    before = np.maximum.accumulate(np.concatenate([[-1], b_hi[:-1]]))
    new = np.maximum(b_hi - np.maximum(b_lo - 1, before), 0)
    step = np.cumsum(new) // _READ_BLOCKS
    bk, br = np.empty(0, np.uint64), np.empty(0, np.int64)
    for lo, hi in equal_runs(step):
        blocks = np.unique(gather_runs(np.arange(len(fence)), b_lo[lo:hi], b_hi[lo:hi] - b_lo[lo:hi] + 1))
        # one pread per stretch of blocks, gaps of up to _GAP_BLOCKS unneeded blocks read through (a
        # syscall costs more than copying them); the blocks read stay a sorted piece of the run
        cut = np.flatnonzero(np.diff(blocks) > _GAP_BLOCKS + 1) + 1
        spans = [(int(blocks[a]) * _BLOCK, min((int(blocks[b - 1]) + 1) * _BLOCK, len(keys)))
                 for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(blocks)])]
        need = sum(b - a for a, b in spans)
        if len(bk) < need:
            bk, br = np.empty(need, np.uint64), np.empty(need, np.int64)
        filled = 0
        for start, stop in spans:
            keys.read(start, stop, bk[filled : filled + stop - start])
            rows.read(start, stop, br[filled : filled + stop - start])
            filled += stop - start
        m, r = sorted_lookup(bk[:filled], br[:filled], uq[live[lo:hi]])
        n[live[lo:hi]] = m
        got.append(r)  # a copy (fancy indexing)
    return n, np.concatenate(got)


class SortedBands:
    """The LSH table (`dedup._Bands`' interface before it): which earlier rows have each band key.

    A log-structured table: each insert adds a sorted run, and a run at least half as big as the one
    before it is merged into it (streaming, at most `_MERGE_CHUNK` entries at a time), so there are O(log n)
    runs and each entry is merged O(log n) times. A merged run bigger than `resident_bytes` goes to a
    `SpillArray` (released after every batch with `release()`); smaller ones stay in memory. A query
    reads a spilled run block by block (its first key of every `_BLOCK` entries, the fence, stays in
    memory: 1/512 of the run): only the blocks that can hold a needle, `_READ_BLOCKS` at a time, with
    pread, so a query costs its blocks, not the run's pages."""

    def __init__(self, folder: str | None = None, resident_bytes: int = 8 * _MIB):
        self.folder, self.resident_bytes = folder, max(int(resident_bytes), 1 << 16)
        self._runs: list[tuple] = []  # (keys, rows, spill arrays or None, fence or None), oldest first

    def query(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(document index, row) for every row sharing a key with keys[document] (repeats possible)."""
        q = np.asarray(keys, np.uint64)
        if q.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        q = q.reshape(len(q), -1)
        width = q.shape[1]
        uq, inv = np.unique(q.ravel(), return_inverse=True)  # sorted needles: local binary searches
        docs, rows = [], []
        for rk, rr, sp, fence in self._runs:
            if len(rk) == 0:
                continue
            # n[i]: the run's entries equal to needle i; got: their rows, needle after needle
            n, got = sorted_lookup(rk, rr, uq) if sp is None else _lookup_blocks(sp, fence, uq)
            hit = np.flatnonzero(n[inv])  # positions in the query (document * width + band)
            if len(hit) == 0:
                continue
            starts = np.cumsum(n) - n
            docs.append(np.repeat(hit // width, n[inv[hit]]))
            rows.append(gather_runs(got, starts[inv[hit]], n[inv[hit]]))
        if not docs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(docs).astype(np.int64), np.concatenate(rows).astype(np.int64)

    def insert(self, rows: np.ndarray, keys: np.ndarray) -> None:
        keys = np.asarray(keys, np.uint64)
        if keys.size == 0:
            return
        k = keys.ravel()
        r = np.repeat(np.asarray(rows, np.int64), keys.shape[1] if keys.ndim > 1 else 1)
        order = np.argsort(k, kind="stable")
        self._runs.append((k[order], r[order], None, None))
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            b, a = self._runs.pop(), self._runs.pop()
            self._runs.append(self._merge(a, b))

    def _merge(self, a: tuple, b: tuple) -> tuple:
        """Two sorted runs -> one, a chunk of `a` at a time (into a SpillArray when big,
        with its fence)."""
        (ak, ar, asp, _), (bk, br, bsp, _) = a, b
        n = len(ak) + len(bk)
        spill = None
        if 16 * n > self.resident_bytes:
            spill = (SpillArray(np.uint64, 1, self.folder, n), SpillArray(np.int64, 1, self.folder, n))
            fence = np.empty((n + _BLOCK - 1) // _BLOCK, np.uint64)
        else:
            outk, outr = np.empty(n, np.uint64), np.empty(n, np.int64)
        at = taken = 0
        step = int(min(max(self.resident_bytes // 64, 4096), _MERGE_CHUNK))  # ~4 copies of 16 bytes a chunk entry
        for lo in range(0, len(ak) + 1, step):
            ck, cr = ak[lo : lo + step], ar[lo : lo + step]
            last = lo + step >= len(ak)
            upto = len(bk) if last else int(np.searchsorted(bk, ck[-1], "right"))
            mk, mr = np.concatenate([ck, bk[taken:upto]]), np.concatenate([cr, br[taken:upto]])
            o = np.argsort(mk, kind="stable")  # two sorted pieces: a linear merge
            if spill is None:
                outk[at : at + len(o)], outr[at : at + len(o)] = mk[o], mr[o]
            else:
                mk = mk[o]
                first = -at % _BLOCK  # the chunk's first entry that starts a block
                fence[(at + first) // _BLOCK : (at + len(o) + _BLOCK - 1) // _BLOCK] = mk[first::_BLOCK]
                spill[0].append(mk)
                spill[1].append(mr[o])
                for s in (asp or ()) + (bsp or ()) + spill:
                    s.release()
            at, taken = at + len(o), upto
            if last:
                break
        for s in (asp or ()) + (bsp or ()):
            s.close()
        if spill is None:
            return outk, outr, None, None
        return spill[0].view(), spill[1].view(), spill, fence

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, _, sp, _ in self._runs for s in (sp or ()))

    def release(self) -> None:
        for _, _, sp, _ in self._runs:
            for s in sp or ():
                s.release()

    def close(self) -> None:
        for _, _, sp, _ in self._runs:
            for s in sp or ():
                s.close()
        self._runs = []
