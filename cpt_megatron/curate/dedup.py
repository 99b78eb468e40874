"""Exact and near-duplicate detection: LSH proposes, exact Jaccard of the shingle sets decides.

Shingles are word n-grams of the whitespace-normalized text (`shingles`). Each shingle is hashed to
64 bits (`shingle_hashes`) with a polynomial hash over its UTF-8 bytes computed for a whole batch of
documents in a few numpy passes (prefix sums of byte * P^-k, so a substring's hash is one multiply),
then mixed (splitmix64). A document's shingle set is kept as its sorted unique uint64 hashes: exact
Jaccard of two documents is one `np.intersect1d` (64-bit collisions are negligible at corpus scale).

`MinHasher` turns the hashes into uint32 MinHash signatures (affine permutations mod 2^32 of the
folded hash, as in datasketch's affine32 scheme); `lsh_params` picks bands x rows for HIGH RECALL at
the threshold (< 0.5% of pairs at exactly the threshold are missed, fewer above it): the false
candidates this lets through are removed by the exact check, so recall is bought with CPU, not
with precision.

`NearDupIndex` makes the sequential decisions: document j is a near-duplicate iff some earlier KEPT
document shares an LSH band with it and has Jaccard >= threshold (`decide: exact`, the default), or
estimated Jaccard from the signatures >= threshold (`decide: estimate`, cheaper, ~0.035 standard
error at J = 0.8 with 128 permutations, so it removes pairs well below the threshold).
The kept documents' shingle sets live in a `ShingleStore` (an append-only file read with pread).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from urllib.parse import parse_qs, urlparse

import numpy as np

from cpt_megatron.curate.config import MinHashConfig
from cpt_megatron.errors import CptError

__all__ = [
    "MinHasher",
    "brute_force_removed",
    "NearDupIndex",
    "NearDupStats",
    "ShingleStore",
    "exact_key",
    "jaccard",
    "lsh_params",
    "shingle_hash_reference",
    "shingle_hashes",
    "shingles",
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


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^k and P^-k (mod 2^64) for k < n, grown geometrically and cached per process."""
    have = _POW_CACHE.get("p")
    if have is None or len(have) < n:
        m = max(n, 2 * (0 if have is None else len(have)), 1 << 16)
        p = np.full(m, _P, dtype=np.uint64)
        p[0] = 1
        q = np.full(m, _PINV, dtype=np.uint64)
        q[0] = 1
        _POW_CACHE["p"], _POW_CACHE["q"] = np.cumprod(p, dtype=np.uint64), np.cumprod(q, dtype=np.uint64)
    return _POW_CACHE["p"], _POW_CACHE["q"]


# str.split() whitespace in UTF-8: single bytes, and the multi-byte sequences (all start C2/E1/E2/E3)
_WS1 = np.zeros(256, bool)
_WS1[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_WS_MULTI = [chr(c).encode() for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                                       0x3000)]


def _whitespace(data: np.ndarray) -> np.ndarray:
    ws = _WS1[data]
    lead = np.flatnonzero((data == 0xC2) | (data == 0xE1) | (data == 0xE2) | (data == 0xE3))
    if len(lead):
        n = len(data)
        for seq in _WS_MULTI:
            k = len(seq)
            pos = lead[lead + k <= n]
            hit = np.ones(len(pos), bool)
            for i, byte in enumerate(seq):
                hit &= data[pos + i] == byte
            for i in range(k):
                ws[pos[hit] + i] = True
    return ws


def shingle_hashes(texts: list[str], n: int = 5, lowercase: bool = False, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique 64-bit shingle hashes of each text: (values uint64, offsets int64[len(texts)+1]).

    Document d's set is values[offsets[d]:offsets[d+1]] and equals
    sorted({shingle_hash_reference(s, seed) for s in shingles(text, n, lowercase)}).
    """
    ndoc = len(texts)
    empty = np.zeros(0, np.uint64), np.zeros(ndoc + 1, np.int64)
    if ndoc == 0:
        return empty
    parts = [(t.lower() if lowercase else t).encode("utf-8", "surrogatepass") for t in texts]
    buf = b"\n".join(parts)  # '\n' is whitespace: no word crosses two texts
    data = np.frombuffer(buf, dtype=np.uint8)
    nb = len(data)
    ws = _whitespace(data)
    edge = np.flatnonzero(np.diff(np.concatenate([[1], ws.view(np.int8), [1]])))
    w_start, w_end = edge[0::2].astype(np.int64), edge[1::2].astype(np.int64)  # runs of non-whitespace
    nw = len(w_start)
    if nw == 0:
        return empty
    starts = np.concatenate([[0], np.cumsum(np.fromiter(map(len, parts), np.int64, ndoc) + 1)[:-1]])
    w_doc = np.searchsorted(starts, w_start, side="right") - 1
    pw, pinv = _powers(nb + 1)
    c = (data.astype(np.uint64) + np.uint64(1)) * pinv[:nb]
    pre = np.concatenate([np.zeros(1, np.uint64), np.cumsum(c, dtype=np.uint64)])
    wh = (pre[w_end] - pre[w_start]) * pw[w_end - 1]
    wh = _splitmix64(wh + (w_end - w_start).astype(np.uint64) * np.uint64(_C) + np.uint64((seed * _S) & _M64))
    counts = np.bincount(w_doc, minlength=ndoc)
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


def brute_force_removed(texts: list[str], cfg: MinHashConfig | None = None) -> set[int]:
    """Ground truth without LSH: index j is removed iff an earlier KEPT text has exact Jaccard >=
    threshold (every pair checked, only the exact size bound skips any). O(n^2): tests and bench."""
    cfg = cfg or MinHashConfig()
    values, offsets = shingle_hashes(texts, cfg.ngram, cfg.lowercase, cfg.seed)
    sizes = np.diff(offsets)
    kept: list[int] = []
    removed = set()
    for j in range(len(texts)):
        s = values[offsets[j] : offsets[j + 1]]
        ks = np.array(kept, dtype=np.int64)
        if len(ks):
            ks = ks[np.minimum(sizes[ks], len(s)) >= cfg.threshold * np.maximum(sizes[ks], len(s))]
        if any(jaccard(values[offsets[i] : offsets[i + 1]], s) >= cfg.threshold for i in ks):
            removed.add(j)
        else:
            kept.append(j)
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


class MinHasher:
    """Batch sketches (uint32[num_docs, num_perm]) from the 64-bit shingle hashes: one-permutation
    MinHash (Li, Owen & Zhang 2012) with rotation densification (Shrivastava & Li 2014).

    Each shingle hash falls in one of `num_perm` bins by its high 32 bits; a bin keeps the low 32 bits
    of its smallest hash; an empty bin borrows the next non-empty bin's value (circularly) plus
    distance * constant. Two documents agree on a bin with probability ~= their Jaccard, as with
    `num_perm` independent permutations, but the cost is one pass over the (already sorted) hashes
    instead of num_perm multiply-adds per shingle. Only candidates come from the sketch (and the
    `estimate` decision); `exact` decisions never depend on it.
    """

    def __init__(self, cfg: MinHashConfig | None = None):
        self.cfg = cfg or MinHashConfig()
        self.empty = np.full(self.cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)

    def hash_sets(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return shingle_hashes(texts, self.cfg.ngram, self.cfg.lowercase, self.cfg.seed)

    def signatures(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Sketches of the sets (values, offsets) from `hash_sets` (sorted within each set); an empty
        set gets all-ones."""
        nbin, ndoc = self.cfg.num_perm, len(offsets) - 1
        out = np.tile(self.empty, (ndoc, 1))
        if len(values) == 0:
            return out
        doc = np.repeat(np.arange(ndoc, dtype=np.int64), np.diff(offsets))
        key = doc * nbin + ((values >> np.uint64(32)) * np.uint64(nbin) >> np.uint64(32)).astype(np.int64)
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]  # values ascend within a set, so bins do: a run's first is its min
        flat = out.reshape(-1)
        flat[key[first]] = (values[first] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
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


class ShingleStore:
    """Append-only store of uint64 sets in a memory-mapped temp file (capacity doubles as it grows, so
    it is remapped O(log n) times): resident memory is the page cache's business, not the process's."""

    def __init__(self, folder: str | None = None, capacity: int = 1 << 20):
        fd, self.path = tempfile.mkstemp(prefix="cpt-shingles-", suffix=".u64", dir=folder)
        os.close(fd)
        self._n = 0  # uint64 values written
        self._cap = 0
        self._arr = np.zeros(0, np.uint64)
        self._grow(capacity)
        self._off = np.zeros(1024, np.int64)  # set i is values()[off[i]:off[i+1]]
        self.count = 0

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._cap)
        self._arr = np.zeros(0, np.uint64)  # drop the old mapping before resizing the file
        with open(self.path, "r+b") as f:
            f.truncate(8 * cap)
        self._arr = np.asarray(np.memmap(self.path, dtype=np.uint64, mode="r+", shape=(cap,)))
        self._cap = cap

    def add(self, values: np.ndarray) -> int:
        """Append one set; returns its row number."""
        k = len(values)
        if self._n + k > self._cap:
            self._grow(self._n + k)
        self._arr[self._n : self._n + k] = values
        self._n += k
        self.count += 1
        if self.count == len(self._off):
            self._off = np.concatenate([self._off, np.zeros_like(self._off)])
        self._off[self.count] = self._n
        return self.count - 1

    def offsets_array(self) -> np.ndarray:
        return self._off[: self.count + 1]

    def values(self) -> np.ndarray:
        return self._arr[: self._n]

    def get(self, row: int) -> np.ndarray:
        return self._arr[self._off[row] : self._off[row + 1]]

    def close(self) -> None:
        self._arr = np.zeros(0, np.uint64)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _redis_storage(url: str, default_basename: str) -> tuple[dict, dict]:
    u = urlparse(url)
    q = parse_qs(u.query)
    conn = {"host": u.hostname or "localhost", "port": u.port or 6379}
    if u.path.strip("/"):
        conn["db"] = int(u.path.strip("/"))
    basename = q.get("basename", [default_basename])[0]
    return {"type": "redis", "basename": basename.encode(), "redis": conn}, conn


class NearDupStats:
    """Per-run near-dup accounting (the same numbers whatever the executor).

    candidate_pairs: (document, earlier kept document) pairs sharing an LSH band; checked_pairs: those
    whose exact Jaccard was computed (the rest fail the size bound or the sketch pre-filter);
    verified_pairs: those at Jaccard >= threshold; removed: documents with at least one."""

    def __init__(self, cfg: MinHashConfig, bands: int, rows: int):
        self.cfg, self.bands, self.rows = cfg, bands, rows
        self.candidate_pairs = self.checked_pairs = self.verified_pairs = self.removed = 0
        self.hist = np.zeros(_HIST_BINS, np.int64)

    def add(self, n_candidates: int, n_checked: int, n_verified: int, removed_j: float | None) -> None:
        self.candidate_pairs += n_candidates
        self.checked_pairs += n_checked
        self.verified_pairs += n_verified
        if removed_j is not None:
            self.removed += 1
            self.hist[min(int(removed_j * _HIST_BINS), _HIST_BINS - 1)] += 1

    def merge(self, other: NearDupStats) -> None:
        self.add(other.candidate_pairs, other.checked_pairs, other.verified_pairs, None)
        self.removed += other.removed
        self.hist += other.hist

    def as_dict(self) -> dict:
        w = 1.0 / _HIST_BINS
        hist = {f"{k * w:.2f}-{(k + 1) * w:.2f}": int(c) for k, c in enumerate(self.hist) if c}
        return {"decide": self.cfg.decide, "threshold": self.cfg.threshold, "num_perm": self.cfg.num_perm,
                "bands": self.bands, "rows": self.rows, "prefilter_margin": self.cfg.prefilter_margin,
                "candidate_pairs": self.candidate_pairs, "checked_pairs": self.checked_pairs,
                "verified_pairs": self.verified_pairs, "removed": self.removed, "removed_jaccard_histogram": hist}


def gather(values: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """values[starts[0]:starts[0]+lens[0]] ++ values[starts[1]:...] ++ ... in one fancy index."""
    total = int(lens.sum())
    if total == 0:
        return values[:0]
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return values[base + np.arange(total)]


def decide_candidates(cfg: MinHashConfig, sig: np.ndarray, shingle_set: np.ndarray | None,
                      cand_sigs: np.ndarray, values: np.ndarray | None = None, starts: np.ndarray | None = None,
                      lens: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Jaccard of one document against its candidates (rows of `cand_sigs`; candidate i's set is
    values[starts[i]:starts[i]+lens[i]]): exact where the size bound and the sketch pre-filter let a
    candidate through, else -1 (not checked); with `decide: estimate` the sketch estimate itself.
    Returns (jaccard per candidate, number checked exactly)."""
    est = (cand_sigs == sig[None, :]).mean(axis=1) if len(cand_sigs) else np.zeros(0)
    if cfg.decide == "estimate":
        return est, len(est)
    t = cfg.threshold
    js = np.full(len(est), -1.0)
    n = len(shingle_set)
    live = np.flatnonzero((est >= t - cfg.prefilter_margin) & (np.minimum(lens, n) >= t * np.maximum(lens, n)))
    if len(live) == 0:
        return js, 0
    if n == 0:
        js[live] = 1.0  # two empty sets (the size bound let only empty ones through)
        return js, len(live)
    ln = lens[live]
    allv = gather(values, starts[live], ln)
    pos = np.minimum(np.searchsorted(shingle_set, allv), n - 1)
    hit = shingle_set[pos] == allv
    inter = np.bincount(np.repeat(np.arange(len(live)), ln)[hit], minlength=len(live))
    js[live] = inter / (ln + n - inter)
    return js, len(live)


class _Bands:
    """In-memory LSH: one dict per band from the band's bytes to the rows that have it."""

    def __init__(self, bands: int, rows: int):
        self.bands, self.rows = bands, rows
        self.tables: list[dict] = [{} for _ in range(bands)]

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        b = sig[: self.bands * self.rows].tobytes()
        w = 4 * self.rows
        return [b[i * w : (i + 1) * w] for i in range(self.bands)]

    def query(self, sig: np.ndarray) -> list[int]:
        out: set[int] = set()
        for t, k in zip(self.tables, self._keys(sig)):
            hit = t.get(k)
            if hit:
                out.update(hit)
        return sorted(out)

    def insert(self, row: int, sig: np.ndarray) -> None:
        for t, k in zip(self.tables, self._keys(sig)):
            t.setdefault(k, []).append(row)


class _RedisBands:
    """datasketch's MinHashLSH on Redis with our banding (rows are stored as their decimal keys)."""

    def __init__(self, cfg: MinHashConfig, bands: int, rows: int, url: str, basename: str):
        import redis
        from datasketch import LeanMinHash, MinHashLSH

        storage, conn = _redis_storage(url, basename)
        self._redis = redis.Redis(**conn)
        try:
            self._redis.ping()
        except redis.exceptions.ConnectionError as e:
            raise CptError(f"cannot reach redis at {url}: {e}; start redis-server or drop --lsh") from e
        # A run owns its basename: stale keys from an earlier run would change decisions.
        for k in self._redis.scan_iter(match=storage["basename"] + b"*"):
            self._redis.delete(k)
        self.lsh = MinHashLSH(num_perm=cfg.num_perm, params=(bands, rows), storage_config=storage)
        self._lean = lambda sig: LeanMinHash(seed=cfg.seed, hashvalues=sig, scheme="affine32")  # label only

    def query(self, sig: np.ndarray) -> list[int]:
        return sorted(int(k) for k in self.lsh.query(self._lean(sig)))

    def insert(self, row: int, sig: np.ndarray) -> None:
        self.lsh.insert(str(row), self._lean(sig), check_duplication=False)

    def close(self) -> None:
        self._redis.close()


class NearDupIndex:
    """Sequential near-duplicate decisions over kept documents.

    `check_and_add(key, sig, shingle_set)` -> (dup_of key or None, best Jaccard). Candidates are the
    earlier kept documents sharing an LSH band (in memory, or on Redis with `lsh_url`); the best is the
    highest Jaccard, ties to the earliest kept document. `stats` accumulates the report.
    """

    def __init__(self, cfg: MinHashConfig, lsh_url: str | None = None, basename: str = "cpt_curate",
                 workdir: str | None = None):
        self.cfg = cfg
        self.bands, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
        self.stats = NearDupStats(cfg, self.bands, self.rows)
        self.lsh = (_RedisBands(cfg, self.bands, self.rows, lsh_url, basename) if lsh_url
                    else _Bands(self.bands, self.rows))
        self._keys: list[str] = []
        self._sigs = np.zeros((1024, cfg.num_perm), np.uint32)
        self._store = ShingleStore(workdir) if cfg.decide == "exact" else None

    def check_and_add(self, key: str, sig: np.ndarray, shingle_set: np.ndarray | None = None):
        rows = self.lsh.query(sig)
        st = self._store
        if st is not None:
            r = np.asarray(rows, np.int64)
            off = st.offsets_array()
            js, checked = decide_candidates(self.cfg, sig, shingle_set, self._sigs[r], st.values(), off[r],
                                            off[r + 1] - off[r])
        else:
            js, checked = decide_candidates(self.cfg, sig, shingle_set, self._sigs[rows])
        ok = js >= self.cfg.threshold
        if ok.any():
            b = int(np.argmax(js))  # first maximum: the earliest kept document
            self.stats.add(len(rows), checked, int(ok.sum()), float(js[b]))
            return self._keys[rows[b]], float(js[b])
        self.stats.add(len(rows), checked, 0, None)
        row = len(self._keys)
        if row == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[row] = sig
        self._keys.append(key)
        if self._store is not None:
            self._store.add(shingle_set)
        self.lsh.insert(row, sig)
        return None, float(max(js.max(initial=0.0), 0.0))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if isinstance(self.lsh, _RedisBands):
            self.lsh.close()
