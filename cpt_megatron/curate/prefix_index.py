"""Exact near-duplicate candidates without enumerating LSH buckets: a prefix (pigeonhole) index.

If J(x, y) >= t then |x & y| >= t |x | y| >= t |y|, so ANY m(y) = |y| - ceil(t |y|) + 1 shingles of y
include one of x's (only ceil(t |y|) - 1 of y's shingles can lie outside x). The index keeps, for each
kept document y, such a subset P(y) -- the m(y) shingles of y seen least often before y (`choose`) --
and a new document x probes it with ALL its shingles (`probe`): every kept y with J(x, y) >= t is found,
whatever P(y) holds. The choice only decides how many other documents come along: on templated text a
document's rarest shingles are its own content, not the template, so x meets the earlier documents that
hold some of x's content, not every document built on the same template (an LSH band made of template
shingles puts all of them in one bucket: m documents, m(m-1)/2 pairs).

Count filter (exact): x with J(x, y) >= t shares >= i_min = ceil(t (|x| + |y|) / (1 + t)) shingles with
y, at most |y| - m(y) of them outside P(y), so x holds >= i_min - |y| + m(y) shingles of P(y).

Counts: `count_bits` hashed slots (uint16, saturating; 2^21 = 4 MiB) of every document checked so far, in input
order: the same choice one document at a time or a batch at a time. A collision only makes a shingle
look commoner; the candidates stay complete. Index: sorted runs of (shingle hash, row), merged
geometrically and streaming (`spill.SortedBands`, spilled to disk), behind a bitmap of the indexed hashes'
top bits (2^25 bits = 4 MiB) so that most of a probe's shingles never reach a binary search.
"""

from __future__ import annotations

import numpy as np

from cpt_megatron.curate.spill import SortedBands, SpillArray, sorted_lookup

__all__ = ["PrefixIndex", "prefix_sizes"]

_SLACK = 1e-6  # float guard: a pair `jaccard` scores >= t is never dropped by a bound computed in floats


def prefix_sizes(sizes: np.ndarray, t: float) -> np.ndarray:
    """m(y) = |y| - ceil(t |y|) + 1 (at most |y|): shingles of y that every x with J >= t meets."""
    sizes = np.asarray(sizes, np.int64)
    return np.minimum(sizes - np.ceil(t * sizes - _SLACK).astype(np.int64) + 1, sizes)


def _min_overlap(sx: np.ndarray, sy: np.ndarray, t: float) -> np.ndarray:
    """The least |x & y| with J >= t: i / (|x| + |y| - i) >= t <=> i >= t (|x| + |y|) / (1 + t)."""
    return np.ceil(t * (sx + sy) / (1.0 + t) - _SLACK).astype(np.int64)


def _probe(keys: np.ndarray, rows: np.ndarray, q: np.ndarray, qdoc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(qdoc, row) for every (q[i], row) entry of the sorted run (keys, rows) with keys == q[i] (q sorted)."""
    if len(keys) == 0 or len(q) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n, got = sorted_lookup(keys, rows, q)
    return np.repeat(qdoc, n), got


def _pairs_with_hits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (x, y) pairs sorted by (x, y), with how many times each occurs."""
    if len(x) == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    span = int(y.max()) + 1
    code, hits = np.unique(x.astype(np.int64) * span + y, return_counts=True)
    return code // span, code % span, hits


def _mark(bitmap: np.ndarray, keys: np.ndarray, shift: np.uint64) -> None:
    """Set the bits of the keys' top bits (keys >> shift) in a uint8 bitmap."""
    slot = keys >> shift
    np.bitwise_or.at(bitmap, (slot >> np.uint64(3)).astype(np.int64),
                     np.left_shift(1, (slot & np.uint64(7)).astype(np.uint8)).astype(np.uint8))


def _marked(bitmap: np.ndarray, keys: np.ndarray, shift: np.uint64) -> np.ndarray:
    slot = keys >> shift
    return (bitmap[(slot >> np.uint64(3)).astype(np.int64)] >> (slot & np.uint64(7)).astype(np.uint8)) & 1


def _sorted_by_x(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.lexsort((y, x))
    return x[o], y[o]


class PrefixIndex:
    """P(y) of the kept documents; `candidates` proposes, for a batch, every (document, earlier kept
    document) pair that can have J >= t, with the count filter applied."""

    FIXED_BYTES = 2 * (1 << 21) + (1 << 20)  # the count slots and the budgeted (23-bit) bitmap, allocated up front

    def __init__(self, threshold: float, count_bits: int = 21, bitmap_bits: int = 25, folder: str | None = None,
                 resident_bytes: int = 1 << 62):
        """resident_bytes: merged runs bigger than this go to nameless temp files (`spill.SortedBands`)."""
        self.t = threshold
        self._count_shift = np.uint64(64 - count_bits)
        self._counts = np.zeros(1 << count_bits, np.uint16)  # saturating
        self._bit_shift = np.uint64(64 - bitmap_bits)
        self._bitmap = np.zeros(1 << (bitmap_bits - 3), np.uint8)
        # sorted (hash, row) runs, merged geometrically and streaming (16 bytes per P entry, spilled)
        self._runs = SortedBands(folder, resident_bytes)
        self._sizes = SpillArray(np.int64, 1, folder)  # |y| of indexed row y
        self._n = 0  # rows indexed (kept documents)
        self._empty_row = -1  # the first kept empty set
        self.probed = 0  # shingles past the bitmap (binary searches per run)
        self._pending: tuple[np.ndarray, np.ndarray] | None = None  # the batch's P entries: (hash, batch doc)

    def choose(self, values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(y) of each set of a batch (sorted hashes; batch doc of each), chosen with the counts of
        every earlier document (earlier batches and earlier in this batch); then counts the batch."""
        nset, lens = len(offsets) - 1, np.diff(offsets)
        doc = np.repeat(np.arange(nset, dtype=np.int64), lens)
        slot = (values >> self._count_shift).astype(np.int64)
        # occurrences of the slot in earlier documents of the batch: sorted by (slot, doc), the index of
        # the entry's first (slot, doc) minus the index of its slot's first entry (equal keys are one
        # (slot, doc): the unstable, vectorized sort is enough)
        order = np.argsort(slot * max(nset, 1) + doc)
        ss, sd = slot[order], doc[order]
        idx = np.arange(len(ss))
        new_slot = np.ones(len(ss), bool)
        new_slot[1:] = ss[1:] != ss[:-1]
        new_doc = new_slot.copy()
        new_doc[1:] |= sd[1:] != sd[:-1]
        first = np.flatnonzero(new_slot)
        cnt = np.empty(len(ss), np.int64)
        cnt[order] = np.maximum.accumulate(np.where(new_doc, idx, 0)) - np.repeat(first, np.diff(np.append(first, len(ss))))
        cnt += self._counts[slot]
        u, c = ss[first], np.diff(np.append(first, len(ss)))  # the batch's own counts, added below
        # per document: least seen first, ties by hash (a set's values ascend: its rank orders them)
        rank = np.arange(len(values)) - np.repeat(offsets[:-1], lens)
        bd, br = int(nset).bit_length(), int(lens.max(initial=1)).bit_length()
        bc = 63 - bd - br
        if bc >= 8:  # one unique int64 key per entry: (doc, count clipped, rank)
            order = np.argsort((doc << (bc + br)) | (np.minimum(cnt, (1 << bc) - 1) << br) | rank)
        else:
            order = np.lexsort((rank, cnt, doc))
        pick = order[rank < np.repeat(prefix_sizes(lens, self.t), lens)]
        self._counts[u] = np.minimum(self._counts[u] + c, np.iinfo(self._counts.dtype).max)
        p_keys, p_doc = values[pick], doc[pick]
        o = np.argsort(p_keys)
        return p_keys[o], p_doc[o]

    def candidates(self, values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, ...]:
        """For a batch of sets: (x, kept row y) and (x, earlier batch doc y) pairs, each sorted by x, holding
        every pair that can reach J >= t: (ox, oy, wx, wy). Call `add` with the kept ones next."""
        lens = np.diff(offsets)
        doc = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        p_keys, p_doc = self._pending = self.choose(values, offsets)
        maybe = np.flatnonzero(_marked(self._bitmap, values, self._bit_shift))
        o = np.argsort(values[maybe])  # sorted queries: each binary search starts where the last ended
        q, qd = values[maybe][o], doc[maybe][o]
        self.probed += len(q)
        qi, oy = self._runs.query(q)
        ox, oy, oh = _pairs_with_hits(qd[qi], oy)
        local = np.zeros(1 << 17, np.uint8)  # the batch's own P entries: a 2^20-bit map first
        _mark(local, p_keys, np.uint64(44))
        maybe = np.flatnonzero(_marked(local, values, np.uint64(44)))
        o = maybe[np.argsort(values[maybe])]
        wx, wy = _probe(p_keys, p_doc, values[o], doc[o])
        later = wx > wy
        wx, wy, wh = _pairs_with_hits(wx[later], wy[later])
        keep_o = self._count_ok(lens[ox], self._sizes.view()[oy], oh)
        keep_w = self._count_ok(lens[wx], lens[wy], wh)
        ox, oy, wx, wy = ox[keep_o], oy[keep_o], wx[keep_w], wy[keep_w]
        empty = np.flatnonzero(lens == 0)  # two empty sets have J = 1 and no shingle to meet on
        if len(empty) and self._empty_row >= 0:
            ox, oy = _sorted_by_x(np.concatenate([ox, empty]), np.concatenate([oy, np.full(len(empty), self._empty_row)]))
        if len(empty) > 1:
            wx, wy = _sorted_by_x(np.concatenate([wx, empty[1:]]), np.concatenate([wy, np.full(len(empty) - 1, empty[0])]))
        return ox, oy, wx, wy

    def _count_ok(self, sx: np.ndarray, sy: np.ndarray, hits: np.ndarray) -> np.ndarray:
        return hits >= _min_overlap(sx, sy, self.t) - sy + prefix_sizes(sy, self.t)

    def add(self, kept: np.ndarray, lens: np.ndarray) -> None:
        """Index P(y) of the batch documents `kept` (indices into the last `candidates` batch; lens: all the
        batch's set sizes) as rows n, n+1, ... in that order."""
        p_keys, p_doc = self._pending
        self._pending = None
        row = np.full(len(lens), -1, np.int64)
        row[kept] = self._n + np.arange(len(kept))
        sel = row[p_doc] >= 0
        self._sizes.append(lens[kept])
        if self._empty_row < 0 and (lens[kept] == 0).any():
            self._empty_row = self._n + int(np.argmax(lens[kept] == 0))
        self._n += len(kept)
        keys = p_keys[sel]
        if len(keys):
            _mark(self._bitmap, keys, self._bit_shift)
            self._runs.insert(row[p_doc[sel]], keys)

    @property
    def nbytes(self) -> int:
        return self._counts.nbytes + self._bitmap.nbytes + self._runs.nbytes + self._sizes.nbytes

    def release(self) -> None:
        """Drop the resident pages of the spilled runs and sizes (read back from their files on demand)."""
        self._runs.release()
        self._sizes.release()

    def close(self) -> None:
        self._runs.close()
        self._sizes.close()
