"""Exact and near-duplicate detection: a prefix index (or LSH) proposes, exact Jaccard of the shingle sets decides.

Shingles are word n-grams of the whitespace-normalized text (`shingles`). Each shingle is hashed to
64 bits (`shingle_hashes`) with a polynomial hash over its UTF-8 bytes computed for a whole batch of
documents in a few numpy passes (prefix sums of byte * P^-k, so a substring's hash is one multiply),
then mixed (splitmix64). A document's shingle set is kept as its sorted unique uint64 hashes: exact
Jaccard of two documents is one sorted-set intersection (64-bit collisions are negligible at corpus
scale).

`oph_sketches` turns the hashes into uint32 one-permutation MinHash sketches (`MinHasher.signatures`:
num_perm bins for LSH; `fine_sketches`: 512 bins for the bands' second pre-filter); `lsh_params`
picks bands x rows for HIGH RECALL at the threshold (< 0.5% of pairs at exactly the threshold are
missed, fewer above it): the false candidates this lets through are removed by the exact check, so
recall is bought with CPU, not with precision.

`NearDupIndex` makes the sequential decisions, a batch at a time: document j is a near-duplicate iff
some earlier KEPT candidate -- from the prefix index (`prefix_index.py`, the default with `decide: exact`:
every earlier kept document that can reach the threshold) or sharing an LSH band key (`band_keys`) --
has Jaccard >= threshold (`decide: exact`, the default; `pair_jaccard`, with its sketch pre-filters for
band candidates), or estimated Jaccard from the sketches >= threshold (`decide: estimate`, cheaper, ~0.035
standard error at J = 0.8 with 128 bins, so it removes pairs well below the threshold). The kept
documents' shingle sets (and, for band candidates, fine sketches) live in `ShingleStore`s (nameless
memory-mapped files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import numpy as np

from cpt_megatron.curate.config import MinHashConfig
from cpt_megatron.curate.prefix_index import PrefixIndex
from cpt_megatron.curate.spill import SpillRuns
from cpt_megatron.errors import CptError
from cpt_megatron.utils import equal_runs, gather_runs

__all__ = [
    "MinHasher",
    "brute_force_removed",
    "NearDupIndex",
    "NearDupStats",
    "ShingleStore",
    "SetTable",
    "band_keys",
    "equal_runs",
    "exact_key",
    "fine_sketches",
    "oph_sketches",
    "hash_ranges",
    "jaccard",
    "lsh_params",
    "pair_jaccard",
    "same_key_pairs",
    "shingle_hash_reference",
    "shingle_hashes",
    "shingles",
    "sketch_se",
    "uses_prefix",
]

_P = np.uint64(0x100000001B3)  # odd multiplier (FNV-64 prime); its inverse mod 2^64 exists
_PINV = np.uint64(pow(int(_P), -1, 1 << 64))
_M64 = (1 << 64) - 1
_HIST_BINS = 20  # Jaccard histogram of removed documents: [0, 0.05), ..., [0.95, 1.0]


def exact_key(text: str, lowercase: bool = False) -> bytes:
    return hashlib.blake2b((text.lower() if lowercase else text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int = 5, lowercase: bool = False) -> list[tuple[str, ...]]:
    """Word n-gram shingles (words as `str.split()` gives them; a text shorter than n words is one
    shingle; empty -> []). The reference definition `shingle_hashes` computes in bulk."""
    words = (text.lower() if lowercase else text).split()
    if not words:
        return []
    if len(words) <= n:
        return [tuple(words)]
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _splitmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


_Q = 0xD6E8FEB86659FD93  # odd multiplier folding word hashes into a shingle hash
_C = 0x9E3779B97F4A7C15  # length salt
_S = 0xC2B2AE3D27D4EB4F  # seed salt


def _mix1(h: int) -> int:
    return int(_splitmix64(np.array([h & _M64], dtype=np.uint64))[0])


def shingle_hash_reference(shingle: tuple[str, ...], seed: int = 1) -> int:
    """The 64-bit hash `shingle_hashes` gives one shingle, in plain Python (the definition, for tests):
    word hash = mix(poly_P(utf-8 bytes + 1) + len*C); shingle = mix(poly_Q(word hashes) + words*C)."""
    h = 0
    for w in shingle:
        b = w.encode("utf-8")
        wh = 0
        for x in b:
            wh = (wh * int(_P) + x + 1) & _M64
        h = (h * _Q + _mix1(wh + len(b) * _C + seed * _S)) & _M64
    return _mix1(h + len(shingle) * _C)


_POW_CACHE: dict[str, np.ndarray] = {}


def _power_table(base: np.uint64, m: int) -> np.ndarray:
    """base^k mod 2^64 for k < m, by doubling: p[L:2L] = p[:L] * base^L (log2 m vector multiplies)."""
    p = np.empty(m, np.uint64)
    p[0] = 1
    filled, step = 1, base
    with np.errstate(over="ignore"):
        while filled < m:
            k = min(filled, m - filled)
            np.multiply(p[:k], step, out=p[filled : filled + k])
            filled += k
            step = step * step
    return p


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^k and P^-k (mod 2^64) for k < n, grown geometrically and cached per process."""
    have = _POW_CACHE.get("p")
    if have is None or len(have) < n:
        m = max(n, 2 * (0 if have is None else len(have)), 1 << 16)
        _POW_CACHE["p"], _POW_CACHE["q"] = _power_table(_P, m), _power_table(_PINV, m)
    return _POW_CACHE["p"], _POW_CACHE["q"]


# str.split() whitespace in UTF-8: single bytes 9-13 and 28-32, and the multi-byte sequences (all start
# C2/E1/E2/E3). Found by vectorized compares: a 256-entry table lookup per byte measured ~7x slower.
_WS_MULTI = [chr(c).encode() for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                                       0x3000)]


_WS_CODES = np.array(sorted(int.from_bytes(seq.ljust(3, b"\0"), "big") for seq in _WS_MULTI), np.int64)


def _byte_at(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """data[idx] as int64, 0 past the end."""
    return np.where(idx < len(data), data[np.minimum(idx, len(data) - 1)], 0).astype(np.int64)


def _whitespace(data: np.ndarray) -> np.ndarray:
    ws = (data <= 32) & ((data >= 28) | ((data >= 9) & (data <= 13)))
    lead = np.flatnonzero((data == 0xC2) | (data == 0xE1) | (data == 0xE2) | (data == 0xE3))
    if len(lead):  # each lead byte with the next two (zero past the end) as one code, looked up at once
        b0 = data[lead].astype(np.int64)
        b1 = _byte_at(data, lead + 1)
        b2 = np.where(b0 == 0xC2, 0, _byte_at(data, lead + 2))  # C2 xx is a 2-byte sequence
        code = (b0 << 16) | (b1 << 8) | b2
        i = np.minimum(np.searchsorted(_WS_CODES, code), len(_WS_CODES) - 1)
        hit = lead[_WS_CODES[i] == code]
        ws[hit] = ws[hit + 1] = True
        three = hit[data[hit] != 0xC2]
        ws[three + 2] = True
    return ws


_HASH_CHUNK_CHARS = 1 << 19  # texts hashed together: the byte-level temporaries are ~40 bytes per byte


def shingle_hashes(texts: list[str], n: int = 5, lowercase: bool = False, seed: int = 1,
                   chunk_chars: int = _HASH_CHUNK_CHARS) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique 64-bit shingle hashes of each text: (values uint64, offsets int64[len(texts)+1]).

    Document d's set is values[offsets[d]:offsets[d+1]] and equals
    sorted({shingle_hash_reference(s, seed) for s in shingles(text, n, lowercase)}).
    Texts go through in runs of ~chunk_chars characters (a longer text alone): the temporaries (and the
    cached power tables) stay ~40x chunk_chars bytes (20-80 MiB by default) whatever the batch, not 40x its
    bytes; a memory budget passes a smaller chunk (`spill.Budget.hash_bytes`).
    """
    ends = np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts)))
    if len(texts) < 2 or ends[-1] <= chunk_chars:
        return _shingle_hashes(texts, n, lowercase, seed)
    cuts = [0]
    while cuts[-1] < len(texts):  # each run ends at the first text that reaches the chunk size
        base = ends[cuts[-1] - 1] if cuts[-1] else 0
        cuts.append(max(cuts[-1] + 1, int(np.searchsorted(ends, base + chunk_chars, "left"))))
    parts = [_shingle_hashes(texts[a:b], n, lowercase, seed) for a, b in zip(cuts[:-1], cuts[1:])]
    values = np.concatenate([v for v, _ in parts])
    offsets = np.concatenate([[0]] + [o[1:] + base for (_, o), base in
                                      zip(parts, np.cumsum([0] + [len(v) for v, _ in parts[:-1]]))])
    return values, offsets.astype(np.int64)


def _shingle_hashes(texts: list[str], n: int, lowercase: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ndoc = len(texts)
    empty = np.zeros(0, np.uint64), np.zeros(ndoc + 1, np.int64)
    if ndoc == 0:
        return empty
    parts = [(t.lower() if lowercase else t).encode("utf-8", "surrogatepass") for t in texts]
    buf = b"\n".join(parts)  # '\n' is whitespace: no word crosses two texts
    data = np.frombuffer(buf, dtype=np.uint8)
    nb = len(data)
    ws = _whitespace(data)
    w = np.ones(nb + 2, bool)  # whitespace before the first byte and after the last
    w[1:-1] = ws
    edge = np.flatnonzero(w[1:] != w[:-1])
    w_start, w_end = edge[0::2].astype(np.int64), edge[1::2].astype(np.int64)  # runs of non-whitespace
    nw = len(w_start)
    if nw == 0:
        return empty
    starts = np.concatenate([[0], np.cumsum(np.fromiter(map(len, parts), np.int64, ndoc) + 1)[:-1]])
    # words per text (each starts in one): ndoc searches among the words, not one per word (measured 17x)
    counts = np.diff(np.append(np.searchsorted(w_start, starts), nw))
    w_doc = np.repeat(np.arange(ndoc, dtype=np.int64), counts)
    pw, pinv = _powers(nb + 1)
    pre = np.zeros(nb + 1, np.uint64)
    c = data.astype(np.uint64)
    c += np.uint64(1)
    c *= pinv[:nb]
    np.cumsum(c, out=pre[1:])
    wh = (pre[w_end] - pre[w_start]) * pw[w_end - 1]
    wh = _splitmix64(wh + (w_end - w_start).astype(np.uint64) * np.uint64(_C) + np.uint64((seed * _S) & _M64))
    # n-grams inside one text (fold word hashes: h = h*Q + w), then one shingle per text shorter than n
    m = max(nw - n + 1, 0)
    j = np.flatnonzero(w_doc[n - 1 : n - 1 + m] == w_doc[:m]) if m else np.zeros(0, np.int64)
    q = np.uint64(_Q)
    h = wh[j].copy()
    for i in range(1, n):
        h = h * q + wh[j + i]
    h = _splitmix64(h + np.uint64((n * _C) & _M64))
    s_doc = w_doc[j]
    short = np.flatnonzero((counts > 0) & (counts < n))
    if len(short):
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])[short]
        k = counts[short]
        hs = wh[first].copy()
        for i in range(1, int(k.max())):
            more = i < k
            hs[more] = hs[more] * q + wh[first[more] + i]
        hs = _splitmix64(hs + k.astype(np.uint64) * np.uint64(_C))
        h, s_doc = np.concatenate([h, hs]), np.concatenate([s_doc, short])
        order = np.argsort(s_doc, kind="stable")
        h, s_doc = h[order], s_doc[order]
    offsets = np.zeros(ndoc + 1, np.int64)
    np.cumsum(np.bincount(s_doc, minlength=ndoc), out=offsets[1:])
    for d in np.flatnonzero(np.diff(offsets) > 1):  # sort each text's hashes in place
        h[offsets[d] : offsets[d + 1]].sort()
    keep = np.ones(len(h), bool)
    keep[1:] = (h[1:] != h[:-1]) | (s_doc[1:] != s_doc[:-1])
    if not keep.all():
        h, s_doc = h[keep], s_doc[keep]
        np.cumsum(np.bincount(s_doc, minlength=ndoc), out=offsets[1:])
    return h, offsets


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique hash arrays (two empty sets: 1.0)."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def brute_force_removed(texts: list[str], cfg: MinHashConfig | None = None, block: int = 1024) -> set[int]:
    """Ground truth without LSH or sketches: index j is removed iff an earlier KEPT text has exact
    Jaccard >= threshold. Every pair's intersection is counted exactly, as the sparse product of the
    document x shingle incidence matrix with itself (in row blocks: memory ~ block x len(texts)).
    Tests and bench only (needs scipy: the dev and bench extras)."""
    import scipy.sparse as sp

    cfg = cfg or MinHashConfig()
    values, offsets = shingle_hashes(texts, cfg.ngram, cfg.lowercase, cfg.seed)
    n, sizes = len(texts), np.diff(offsets)
    uniq, col, df = np.unique(values, return_inverse=True, return_counts=True)
    shared = df[col] >= 2  # a shingle in one text adds to no intersection
    rows = np.repeat(np.arange(n), sizes)[shared]
    inc = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, col[shared])), shape=(n, len(uniq)))
    earlier: dict[int, list[int]] = {}
    for lo in range(0, n, block):
        c = (inc[lo : lo + block] @ inc.T).tocoo()  # float32 counts: exact below 2**24 shingles
        i, j, inter = c.row.astype(np.int64) + lo, c.col.astype(np.int64), c.data.astype(np.int64)
        later = i < j
        i, j, inter = i[later], j[later], inter[later]
        near = inter / (sizes[i] + sizes[j] - inter) >= cfg.threshold  # as jaccard() divides
        for a, b in zip(i[near].tolist(), j[near].tolist()):
            earlier.setdefault(b, []).append(a)
    empty = np.flatnonzero(sizes == 0).tolist()  # two empty sets have Jaccard 1.0: the first one is kept
    for b in empty[1:]:
        earlier.setdefault(b, []).append(empty[0])
    removed: set[int] = set()
    for j in range(n):
        if any(a not in removed for a in earlier.get(j, ())):
            removed.add(j)
    return removed


def lsh_params(threshold: float, num_perm: int, max_miss: float = 0.005) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm: the most rows per band (fewest false candidates)
    whose chance of missing a pair AT the threshold, (1 - t^r)^b, is <= max_miss."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if (1.0 - threshold**r) ** b <= max_miss:
            best = (b, r)
    return best


def oph_sketches(values: np.ndarray, offsets: np.ndarray, nbin: int, densify: bool = True) -> np.ndarray:
    """uint32[num_sets, nbin] one-permutation MinHash sketches (Li, Owen & Zhang 2012) of the sets
    (values, offsets) from `shingle_hashes` (sorted within each set).

    Each hash falls in one of `nbin` bins by its high 32 bits; a bin keeps the low 32 bits of its
    smallest hash. densify: an empty bin borrows the next non-empty bin's value (circularly) plus
    distance * constant (rotation, Shrivastava & Li 2014), so two documents agree on a bin with
    probability ~= their Jaccard, as with `nbin` independent permutations; else empty bins (and empty
    sets) stay all-ones. The cost is one pass over the sorted hashes, not nbin multiply-adds per shingle."""
    ndoc = len(offsets) - 1
    out = np.full((ndoc, nbin), np.iinfo(np.uint32).max, dtype=np.uint32)
    if len(values) == 0:
        return out
    doc = np.repeat(np.arange(ndoc, dtype=np.int64), np.diff(offsets))
    key = doc * nbin + ((values >> np.uint64(32)) * np.uint64(nbin) >> np.uint64(32)).astype(np.int64)
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]  # values ascend within a set, so bins do: a run's first is its min
    flat = out.reshape(-1)
    flat[key[first]] = (values[first] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    if not densify:
        return out
    filled = np.zeros(ndoc * nbin, bool)
    filled[key[first]] = True
    filled = filled.reshape(ndoc, nbin)
    rows = np.flatnonzero(filled.any(axis=1) & ~filled.all(axis=1))
    if len(rows):  # densify: next filled bin to the right, circularly
        f2 = np.concatenate([filled[rows], filled[rows]], axis=1)
        idx = np.where(f2, np.arange(2 * nbin), 4 * nbin)
        nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, :nbin]
        dist = (nxt - np.arange(nbin)).astype(np.uint32)
        sub = out[rows]
        borrowed = np.take_along_axis(sub, nxt % nbin, axis=1) + dist * np.uint32(0x9E3779B1)
        out[rows] = np.where(filled[rows], sub, borrowed)
    return out


class MinHasher:
    """The configured shingling (`hash_sets`) and LSH sketches (`signatures`: num_perm densified bins).
    Only candidates come from the sketch (and the `estimate` decision); `exact` decisions never do."""

    def __init__(self, cfg: MinHashConfig | None = None, sketch: bool = True, chunk_chars: int = _HASH_CHUNK_CHARS):
        self.cfg = cfg or MinHashConfig()
        self.sketch = sketch  # False (`uses_prefix`: nothing reads them): zero-width signatures
        self.chunk_chars = chunk_chars  # text hashed in one numpy pass (`shingle_hashes`)

    def hash_sets(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return shingle_hashes(texts, self.cfg.ngram, self.cfg.lowercase, self.cfg.seed, self.chunk_chars)

    def signatures(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """uint32[num_sets, num_perm] sketches of the sets from `hash_sets`; an empty set gets all-ones."""
        if not self.sketch:
            return np.zeros((len(offsets) - 1, 0), np.uint32)
        return oph_sketches(values, offsets, self.cfg.num_perm)


class ShingleStore(SpillRuns):
    """Append-only store of uint64 sets (nameless memory-mapped temp files): resident memory is the page
    cache's business, not the process's (`release()`)."""

    def __init__(self, folder: str | None = None, capacity: int = 1 << 20):
        super().__init__(np.uint64, folder, capacity)


def _redis_conn(url: str) -> dict:
    u = urlparse(url)
    conn = {"host": u.hostname or "localhost", "port": u.port or 6379}
    if u.path.strip("/"):
        conn["db"] = int(u.path.strip("/"))
    return conn


class NearDupStats:
    """Per-run near-dup accounting (the same numbers whatever the executor).

    candidate_pairs: (document, earlier kept document) pairs sharing an LSH band; checked_pairs: those
    whose exact Jaccard was computed (the rest fail the size bound or the sketch pre-filter);
    verified_pairs: those at Jaccard >= threshold; removed: documents with at least one."""

    def __init__(self, cfg: MinHashConfig, bands: int, rows: int, candidates: str | None = None):
        self.cfg, self.bands, self.rows = cfg, bands, rows
        self.candidates = candidates or ("prefix" if uses_prefix(cfg) else "bands")
        self.candidate_pairs = self.checked_pairs = self.verified_pairs = self.removed = 0
        self.hist = np.zeros(_HIST_BINS, np.int64)

    def add(self, n_candidates: int, n_checked: int, n_verified: int, removed_j: float | None) -> None:
        """One document's counts; removed_j: its best Jaccard if it was removed."""
        self.add_batch(np.array([n_candidates]), np.array([n_checked]), np.array([n_verified]),
                       np.array([] if removed_j is None else [removed_j]))

    def add_batch(self, n_candidates: np.ndarray, n_checked: np.ndarray, n_verified: np.ndarray,
                  removed_j: np.ndarray) -> None:
        """Per-document counts of a batch; removed_j: the best Jaccard of each removed document."""
        self.candidate_pairs += int(n_candidates.sum())
        self.checked_pairs += int(n_checked.sum())
        self.verified_pairs += int(n_verified.sum())
        self.removed += len(removed_j)
        bins = np.minimum((np.asarray(removed_j) * _HIST_BINS).astype(np.int64), _HIST_BINS - 1)
        self.hist += np.bincount(bins, minlength=_HIST_BINS)

    def as_dict(self) -> dict:
        w = 1.0 / _HIST_BINS
        hist = {f"{k * w:.2f}-{(k + 1) * w:.2f}": int(c) for k, c in enumerate(self.hist) if c}
        return {"decide": self.cfg.decide, "threshold": self.cfg.threshold, "num_perm": self.cfg.num_perm,
                "candidates": self.candidates, "bands": self.bands, "rows": self.rows,
                "prefilter_sigmas": None if self.candidates == "prefix" else self.cfg.prefilter_sigmas,
                "candidate_pairs": self.candidate_pairs, "checked_pairs": self.checked_pairs,
                "verified_pairs": self.verified_pairs, "removed": self.removed, "removed_jaccard_histogram": hist}


def prefilter_chunk(resident_bytes: int | None) -> int:
    """Pairs pre-filtered at once (`pair_jaccard`): their gathered sketches (2 KiB a side with 512 bins) in
    ~1/16 of the index's resident share (None: unbounded)."""
    return 1 << 16 if resident_bytes is None else int(np.clip(resident_bytes // (16 << 10), 256, 1 << 16))


def uses_prefix(cfg: MinHashConfig, lsh_url: str | None = None) -> bool:
    """Whether `NearDupIndex` proposes candidates with the prefix index (else LSH bands)."""
    return cfg.decide == "exact" and cfg.candidates == "prefix" and not lsh_url


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[num_docs, bands]: band b's key is a 64-bit mix of b and the band's `rows` sketch values.
    Two documents are LSH candidates iff they share a key (in memory, on Redis and across Slurm tasks)."""
    sigs = np.asarray(sigs)
    out = np.empty((len(sigs), bands), np.uint64)
    for b in range(bands):
        h = np.full(len(sigs), b, np.uint64)
        for c in range(b * rows, (b + 1) * rows):
            h = _splitmix64(h ^ sigs[:, c].astype(np.uint64))
        out[:, b] = h
    return out


FINE_BINS = 512  # the second sketch `exact` pre-filters with (0.018 standard error at J = 0.8)
_RANGE_BITS = 4  # hash-range offsets: each set's count below k/16 of the 64-bit range, k = 0..16
_SUBSAMPLE = 128  # the subsample check reads at least this many values of the document


def hash_ranges(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int32[num_sets, 17]: row d, column k = how many of set d's (sorted) values lie below k/16 of the
    hash range, so values[offsets[d]:offsets[d] + r[d, k]] is the set restricted to that range."""
    nset, nr = len(offsets) - 1, 1 << _RANGE_BITS
    out = np.zeros((nset, nr + 1), np.int32)
    if nset and len(values):
        doc = np.repeat(np.arange(nset, dtype=np.int64), np.diff(offsets))
        cell = doc * nr + (np.asarray(values) >> np.uint64(64 - _RANGE_BITS)).astype(np.int64)
        np.cumsum(np.bincount(cell, minlength=nset * nr).reshape(nset, nr), axis=1, out=out[:, 1:])
    return out


_EMPTY = np.uint32(0xFFFFFFFF)


def fine_sketches(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """uint32[num_sets, FINE_BINS]: the sets' one-permutation sketches with FINE_BINS bins, empty bins
    left empty (all-ones): `_fine_estimate` counts agreement over the bins either set fills."""
    return oph_sketches(values, offsets, FINE_BINS, densify=False)


def _fine_estimate(pa: np.ndarray, pb: np.ndarray, sa: np.ndarray, sb: np.ndarray,
                   chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(Jaccard estimate, bins used) per pair from undensified sketches: equal filled bins / bins
    filled in either (the one-permutation estimator; small sets fill ~one bin per shingle)."""
    est, used = np.empty(len(pa)), np.empty(len(pa))
    chunk = _rows_per_chunk(chunk, sa.shape[1])
    for lo in range(0, len(pa), chunk):
        a, b = np.asarray(sa)[pa[lo : lo + chunk]], np.asarray(sb)[pb[lo : lo + chunk]]
        both_empty = np.count_nonzero(np.minimum(a, b) == _EMPTY, axis=1)  # empty = the largest value
        either = a.shape[1] - both_empty
        est[lo : lo + chunk] = (np.count_nonzero(a == b, axis=1) - both_empty) / np.maximum(either, 1)
        used[lo : lo + chunk] = either
    return est, used


@dataclass(frozen=True)
class SetTable:
    """Documents' sketches and shingle sets: document i has sigs[i] and values[offsets[i]:offsets[i+1]],
    ranges[i] = `hash_ranges` and fine[i] = `fine_sketches` of its set (None with `decide: estimate`)."""

    sigs: np.ndarray
    values: np.ndarray | None = None
    offsets: np.ndarray | None = None
    ranges: np.ndarray | None = None
    fine: np.ndarray | None = None

    def lens(self, idx: np.ndarray) -> np.ndarray:
        return self.offsets[idx + 1] - self.offsets[idx]


def _intersections(s: np.ndarray, values: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """|s & values[starts[i]:starts[i]+lens[i]]| for each i (s and every run sorted, unique)."""
    if len(s) == 0 or len(lens) == 0:
        return np.zeros(len(lens), np.int64)
    allv = gather_runs(values, starts, lens)
    hit = np.append(s, s[-1])[np.searchsorted(s, allv)] == allv  # past the end lands on s[-1] < it: no match
    c = np.concatenate([[0], np.cumsum(hit, dtype=np.int64)])[np.cumsum(lens)]
    c[1:] -= c[:-1].copy()
    return c


def pair_jaccard(cfg: MinHashConfig, pa: np.ndarray, pb: np.ndarray, a: SetTable, b: SetTable,
                 chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard of document pa[k] of `a` and pb[k] of `b`, for pairs sorted by pa.

    `estimate`: the sketch estimate. `exact`: the exact Jaccard of the pairs that pass the filters, else
    -1 (not checked): the size bound (exact); then, with z = `prefilter_sigmas` (None: no more filters),
    the 128-bin and the 512-bin sketch estimates each >= threshold - z * `sketch_se` for the pair's size
    (short documents get wide margins: no filter at all below ~10 shingles); and for large sets a
    subsample check: both sets restricted to the lowest hash ranges holding >= 128 of a's values are a
    uniform sample of the union, and a pair whose sample Jaccard is more than z standard errors below
    the threshold, or whose exact upper bound (sample overlap + the smaller remainder) is below it, is
    not checked. Returns (jaccard, checked)."""
    n, t = len(pa), cfg.threshold
    if cfg.decide == "estimate":
        return _estimate(pa, pb, a.sigs, b.sigs, chunk), np.ones(n, bool)
    js = np.full(n, -1.0)
    la, lb = a.lens(pa), b.lens(pb)
    idx = np.flatnonzero(np.minimum(la, lb) >= t * np.maximum(la, lb))  # the size bound first: no sketch read
    z = cfg.prefilter_sigmas
    if z is not None:  # each pair's margin: z standard errors of the estimate for ITS size
        small = np.minimum(la[idx], lb[idx])
        est = _estimate(pa[idx], pb[idx], a.sigs, b.sigs, chunk)
        idx = idx[est >= t - z * sketch_se(t, a.sigs.shape[1], small)]
        if a.fine is not None and b.fine is not None and len(idx):  # the finer sketch, same confidence
            est, used = _fine_estimate(pa[idx], pb[idx], a.fine, b.fine, chunk)
            idx = idx[est >= t - z * sketch_se(t, FINE_BINS, used, densified=False)]
    z = np.inf if z is None else z
    live = np.zeros(n, bool)
    nr = 1 << _RANGE_BITS
    for lo, hi in equal_runs(pa[idx]):  # per document of `a`, against all its live partners
        k = idx[lo:hi]
        d = int(pa[k[0]])
        s = a.values[a.offsets[d] : a.offsets[d + 1]]
        if len(s) >= 2 * _SUBSAMPLE and a.ranges is not None and b.ranges is not None:
            cut = min(nr, -(-_SUBSAMPLE * nr // len(s)))  # ranges [0, cut/16): ~128+ of s
            na, nb = int(a.ranges[d, cut]), b.ranges[pb[k], cut].astype(np.int64)
            inter = _intersections(s[:na], b.values, b.offsets[pb[k]], nb)
            union = na + nb - inter
            sample = inter / np.maximum(union, 1)
            bound = inter + np.minimum(len(s) - na, lb[k] - nb)
            keep = (sample >= t - z * np.sqrt(t * (1 - t) / np.maximum(union, 1))) & \
                   (bound >= t * (len(s) + lb[k] - bound) - 1e-9)
            k = k[keep]
        live[k] = True
        if len(s) == 0:
            js[k] = 1.0  # two empty sets (the size bound let only empty ones through)
            continue
        inter = _intersections(s, b.values, b.offsets[pb[k]], lb[k])
        js[k] = inter / (lb[k] + len(s) - inter)
    return js, live


def sketch_se(t: float, bins: int, n: np.ndarray, densified: bool = True) -> np.ndarray:
    """Standard error of a one-permutation sketch's Jaccard estimate at Jaccard t, per pair.

    densified (`oph_sketches`, n = the smaller set's size): a set of n shingles fills m = bins(1 - e^(-n/bins))
    bins on average and the empty ones copy a filled neighbour, so the estimate averages m independent
    agreements with run-length weights (geometric, mean bins/m): variance t(1-t)(2/m - 1/bins), which is
    t(1-t)/bins for long documents and ~2t(1-t)/n for short ones (a 30-shingle paragraph: 0.105, not the
    0.035 of a long document). Undensified (`_fine_estimate`, n = bins filled in either set): each filled
    bin's minimum is a draw from the union without replacement, variance <= t(1-t)/n."""
    n = np.asarray(n, np.float64)
    if densified:
        m = bins * -np.expm1(-n / bins)
        var = t * (1 - t) * (2.0 / np.maximum(m, 1e-9) - 1.0 / bins)
    else:
        var = t * (1 - t) / np.maximum(n, 1.0)
    return np.sqrt(np.maximum(var, t * (1 - t) / bins))


_CHUNK_BYTES = 8 << 20  # one gathered block of sketches: 8 MiB (a 512-bin pair is 2 KiB a side)


def _rows_per_chunk(chunk: int, bins: int) -> int:
    """At most `chunk` pairs, and at most _CHUNK_BYTES of uint32 sketch rows per side: the pre-filters'
    temporaries (two gathered blocks and their comparisons) stay ~40 MiB whatever the batch's pair count."""
    return max(1, min(chunk, _CHUNK_BYTES // (4 * max(bins, 1))))


def _estimate(pa: np.ndarray, pb: np.ndarray, sa: np.ndarray, sb: np.ndarray, chunk: int) -> np.ndarray:
    """Sketch estimate of each pair's Jaccard (fraction of equal bins), chunk pairs at a time."""
    est = np.empty(len(pa))
    chunk = _rows_per_chunk(chunk, sa.shape[1])
    for lo in range(0, len(pa), chunk):  # bounded memory: chunk x bins sketch values at a time
        eq = np.asarray(sa)[pa[lo : lo + chunk]] == np.asarray(sb)[pb[lo : lo + chunk]]
        est[lo : lo + chunk] = np.count_nonzero(eq, axis=1)
    return est / max(sa.shape[1], 1)


def same_key_pairs(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (later, earlier) pair of `ids` sharing a key, unique, sorted by (later, earlier)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((ids, keys))
    k, g = keys[order], ids[order]
    start = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
    size = np.diff(np.concatenate([start, [len(k)]]))
    pj, pi = [], []
    for st, m in zip(start[size > 1].tolist(), size[size > 1].tolist()):
        lo, hi = np.triu_indices(m, 1)
        pi.append(g[st + lo])
        pj.append(g[st + hi])
    if not pj:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pj, pi = np.concatenate(pj), np.concatenate(pi)
    keep = pj != pi  # one document with a key twice (two equal bands) is not a pair
    return _unique_pairs(pj[keep], pi[keep])


def _unique_pairs(pj: np.ndarray, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(pj) == 0:
        return pj.astype(np.int64), pi.astype(np.int64)
    pj, pi = pj.astype(np.int64), pi.astype(np.int64)
    span = int(pi.max()) + 1
    if int(pj.max()) < (1 << 62) // span:  # one int64 code per pair: a flat sort
        u = np.unique(pj * span + pi)
        return u // span, u % span
    order = np.lexsort((pi, pj))
    pj, pi = pj[order], pi[order]
    first = np.concatenate([[True], (pj[1:] != pj[:-1]) | (pi[1:] != pi[:-1])])
    return pj[first], pi[first]


class _RedisBands:
    """The same table on Redis (one list per band key, `BASENAME:KEY`), read and written in pipelines:
    several processes or a restarted one see one index, and the decisions equal the in-memory ones."""

    def __init__(self, url: str, basename: str):
        import redis

        conn = _redis_conn(url)
        self.prefix = parse_qs(urlparse(url).query).get("basename", [basename])[0] + ":"
        self._redis = redis.Redis(**conn)
        try:
            self._redis.ping()
        except redis.exceptions.ConnectionError as e:
            raise CptError(f"cannot reach redis at {url}: {e}; start redis-server or drop --lsh") from e
        # A run owns its basename: stale keys from an earlier run would change decisions.
        for k in self._redis.scan_iter(match=self.prefix + "*", count=10_000):
            self._redis.delete(k)

    def query(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pipe = self._redis.pipeline(transaction=False)
        for k in keys.ravel().tolist():
            pipe.lrange(f"{self.prefix}{k:016x}", 0, -1)
        hits = pipe.execute()
        lens = np.fromiter(map(len, hits), np.int64, len(hits))
        rows = np.fromiter(map(int, itertools.chain.from_iterable(hits)), np.int64, int(lens.sum()))
        return np.repeat(np.arange(len(hits)) // max(keys.shape[1], 1), lens), rows

    def insert(self, rows: np.ndarray, keys: np.ndarray) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for r, ks in zip(rows.tolist(), keys.tolist()):
            for k in ks:
                pipe.rpush(f"{self.prefix}{k:016x}", r)
        pipe.execute()

    def close(self) -> None:
        self._redis.close()


class NearDupIndex:
    """Sequential near-duplicate decisions over kept documents, a batch at a time.

    `check_batch(keys, sigs, values, offsets)` -> [(dup_of key or None, best Jaccard)] per document, in
    order: document j is a near-duplicate iff an earlier KEPT document (before the batch, or earlier in
    it) is a candidate of it at Jaccard >= threshold; the best is the highest Jaccard, ties to the
    earliest kept document. Candidates (`candidates`): `prefix` (`prefix_index.PrefixIndex`: every
    earlier kept document with J >= threshold, each checked exactly, so the decisions are
    `brute_force_removed`'s) or `bands` (documents
    sharing an LSH band key: < 0.5% of pairs AT the threshold missed; in memory, or on Redis with
    `lsh_url`). The decisions and the report equal one `check_batch` per document whatever the batch
    size (a pair's Jaccard depends only on the two documents, the prefix index chooses with the counts
    of the documents before each one, and the batch resolves who is kept in order); `stats`
    accumulates the report.
    """

    def __init__(self, cfg: MinHashConfig, lsh_url: str | None = None, basename: str = "cpt_curate",
                 workdir: str | None = None, resident_bytes: int | None = None):
        from cpt_megatron.curate.spill import SortedBands, SpillArray, SpillBytes

        self.cfg = cfg
        self.bands, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
        # under a memory budget a 1 MiB probe bitmap (more probes pass it; the same candidates) instead of 4
        # its runs: in memory up to a quarter of the resident share (all of them without a budget)
        self.prefix = PrefixIndex(cfg.threshold, bitmap_bits=25 if resident_bytes is None else 23, folder=workdir,
                                  resident_bytes=1 << 62 if resident_bytes is None else resident_bytes // 4) \
            if uses_prefix(cfg, lsh_url) else None
        self.stats = NearDupStats(cfg, self.bands, self.rows, "prefix" if self.prefix is not None else "bands")
        # the kept documents' state lives in nameless memory-mapped files (spill.py); above
        # `resident_bytes` (None: never) their mapped pages are released after every batch
        self.resident_bytes = resident_bytes
        self._chunk = prefilter_chunk(resident_bytes)
        self.lsh = None if self.prefix is not None else _RedisBands(lsh_url, basename) if lsh_url else \
            SortedBands(workdir, (resident_bytes or 32 << 20) // 4)
        self._keys = SpillBytes(workdir)
        # `prefix` decides on the exact Jaccard alone (its candidates are few: the sketch pre-filters cost
        # more than they save), so it keeps no sketches of the kept documents
        self._filters = self.prefix is None
        self._pair_cfg = cfg if self._filters else dataclasses.replace(cfg, prefilter_sigmas=None)
        self._sigs = SpillArray(np.uint32, cfg.num_perm, workdir)
        self._ranges = SpillArray(np.int32, (1 << _RANGE_BITS) + 1, workdir)
        self._store = ShingleStore(workdir) if cfg.decide == "exact" else None
        # FINE_BINS/2 uint64 per doc
        self._fine = ShingleStore(workdir) if cfg.decide == "exact" and self._filters else None

    def _spills(self) -> list:
        return [s for s in (self.lsh, self.prefix, self._keys, self._sigs, self._ranges, self._store, self._fine)
                if hasattr(s, "release")]

    def _key(self, i: int) -> str:
        return self._keys[i].decode("utf-8", "surrogatepass")

    def _kept_table(self) -> SetTable:
        st = self._store
        if st is None:
            return SetTable(self._sigs.view())
        if not self._filters:
            return SetTable(self._sigs.view(), st.values(), st.offsets_array())
        fine = self._fine.values().view(np.uint32).reshape(-1, FINE_BINS)
        return SetTable(self._sigs.view(), st.values(), st.offsets_array(), self._ranges.view(), fine)

    def check_batch(self, keys: list[str], sigs: np.ndarray, values: np.ndarray | None = None,
                    offsets: np.ndarray | None = None, ranges: np.ndarray | None = None,
                    fine: np.ndarray | None = None) -> list[tuple[str | None, float]]:
        """keys[j], sigs[j] (and with `decide: exact` the set values[offsets[j]:offsets[j+1]]) per document;
        `hash_ranges` and `fine_sketches` of the sets when the caller has them (computed here if not)."""
        b, n, t = len(keys), len(self._keys), self.cfg.threshold
        if b == 0:
            return []
        sigs = np.asarray(sigs, np.uint32)
        sigs = sigs.reshape(b, sigs.size // b)  # zero-width with `MinHasher(sketch=False)`
        if values is None:
            batch = SetTable(sigs)
        elif not self._filters:
            batch = SetTable(sigs, values, offsets)
        else:
            batch = SetTable(sigs, values, offsets, hash_ranges(values, offsets) if ranges is None else ranges,
                             fine_sketches(values, offsets) if fine is None else fine)
        if self.prefix is not None:
            bk = None
            oj, oc, wj, wi = self.prefix.candidates(batch.values, batch.offsets)
        else:
            bk = band_keys(sigs, self.bands, self.rows)
            oj, oc = _unique_pairs(*self.lsh.query(bk))  # with kept rows before the batch
            wj, wi = same_key_pairs(bk.ravel(), np.repeat(np.arange(b), self.bands))  # with earlier batch docs
        js_o, ch_o = pair_jaccard(self._pair_cfg, oj, oc, batch, self._kept_table(), self._chunk)
        js_w, ch_w = pair_jaccard(self._pair_cfg, wj, wi, batch, batch, self._chunk)
        pj, pc = np.concatenate([oj, wj]), np.concatenate([oc, wi + n])  # c >= n: batch document c - n
        js, checked = np.concatenate([js_o, js_w]), np.concatenate([ch_o, ch_w])
        ok = js >= t
        kept = np.ones(b, bool)
        okj, okc = pj[ok], pc[ok]
        order = np.lexsort((okc, okj))
        for j, c in zip(okj[order].tolist(), okc[order].tolist()):  # in order: c - n < j is decided already
            if c < n or kept[c - n]:
                kept[j] = False
        valid = (pc < n) | kept[np.maximum(pc - n, 0)]  # only kept documents are candidates
        pj, pc, js, checked, ok = pj[valid], pc[valid], js[valid], checked[valid], ok[valid]
        best_j, best_c = np.zeros(b), np.full(b, -1, np.int64)
        if len(pj):
            order = np.lexsort((pc, -js, pj))  # per document: highest Jaccard, then earliest
            first = order[np.concatenate([[True], pj[order][1:] != pj[order][:-1]])]
            best_j[pj[first]], best_c[pj[first]] = np.maximum(js[first], 0.0), pc[first]
        self.stats.add_batch(np.bincount(pj, minlength=b), np.bincount(pj[checked], minlength=b),
                             np.bincount(pj[ok], minlength=b), best_j[~kept])
        out = [(None, float(best_j[j])) if kept[j] else
               (self._key(c) if (c := int(best_c[j])) < n else keys[c - n], float(best_j[j])) for j in range(b)]
        self._add(keys, bk, kept, batch)
        if self.resident_bytes is not None and sum(s.nbytes for s in self._spills()) > self.resident_bytes:
            for s in self._spills():
                s.release()
        return out

    def _add(self, keys: list[str], bk: np.ndarray, kept: np.ndarray, batch: SetTable) -> None:
        n, idx = len(self._keys), np.flatnonzero(kept)
        if self._filters:
            self._sigs.append(batch.sigs[idx])
        self._keys.extend([keys[i].encode("utf-8", "surrogatepass") for i in idx.tolist()])
        if self._store is not None:
            lens = batch.lens(idx)
            self._store.add_many(gather_runs(batch.values, batch.offsets[idx], lens), lens)
        if self._fine is not None:
            self._ranges.append(batch.ranges[idx])
            self._fine.add_many(np.ascontiguousarray(batch.fine[idx]).view(np.uint64).reshape(-1),
                                np.full(len(idx), FINE_BINS // 2, np.int64))
        if self.prefix is not None:
            self.prefix.add(idx, np.diff(batch.offsets))
        else:
            self.lsh.insert(np.arange(n, n + len(idx)), bk[idx])

    def close(self) -> None:
        for s in (self._store, self._fine, self._keys, self._sigs, self._ranges):
            if s is not None:
                s.close()
        if self.lsh is not None:
            self.lsh.close()
        if self.prefix is not None:
            self.prefix.close()
