"""Exact and near-duplicate detection.

`MinHasher` computes the exact signatures datasketch's `MinHash()` (scheme affine32, seed 1, SHA-1
32-bit shingle hashes) would, but for a whole batch of documents with a handful of numpy calls instead of
one `update` per shingle: the same signatures give the same LSH buckets, so decisions match the
tutorial loop while running many times faster.

`NearDupIndex` wraps `datasketch.MinHashLSH` (in memory or on Redis) and VERIFIES each LSH candidate:
a document is a near-duplicate only if an earlier kept document has estimated Jaccard >= threshold.
Templated corpora put many pairs at Jaccard 0.6-0.95 that share a band; "has a candidate" alone would
remove ~5x too much (see notes/cpu-anchors.md).
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qs, urlparse

import numpy as np

from cpt_megatron.curate.config import MinHashConfig
from cpt_megatron.errors import CptError

__all__ = ["MinHasher", "NearDupIndex", "exact_key", "shingles"]


def exact_key(text: str, lowercase: bool = False) -> bytes:
    return hashlib.blake2b((text.lower() if lowercase else text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int = 5, lowercase: bool = False) -> list[bytes]:
    """Word n-gram shingles as UTF-8 bytes (a text shorter than n words is one shingle; empty -> [])."""
    if lowercase:
        text = text.lower()
    words = " ".join(text.split()).encode("utf-8").split(b" ")
    if words == [b""]:
        return []
    if len(words) <= n:
        return [b" ".join(words)]
    return [b" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def _fmix32(h: np.ndarray) -> np.ndarray:
    # murmur3 finalizer, as datasketch applies to 32-bit input hashes before the affine permutation
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Batch MinHash signatures (uint32[num_docs, num_perm]) identical to datasketch's MinHash."""

    def __init__(self, cfg: MinHashConfig | None = None):
        from datasketch import MinHash

        self.cfg = cfg or MinHashConfig()
        proto = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)
        if proto.scheme != "affine32":
            raise CptError(f"datasketch MinHash default scheme is {proto.scheme!r}; this code expects 'affine32'")
        a, b = proto.permutations
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)
        self.empty = np.asarray(proto.hashvalues, dtype=np.uint32)

    def hashes(self, text: str) -> bytes:
        """SHA-1 32-bit hashes of the shingles, little-endian uint32 bytes (what datasketch feeds its permutations)."""
        sha1 = hashlib.sha1
        return b"".join([sha1(s).digest()[:4] for s in shingles(text, self.cfg.ngram, self.cfg.lowercase)])

    def signatures(self, texts: list[str], chunk: int = 1 << 15) -> np.ndarray:
        """Signatures of `texts` (a document with no shingles gets datasketch's empty signature)."""
        parts = [self.hashes(t) for t in texts]
        counts = np.array([len(p) // 4 for p in parts], dtype=np.int64)
        hv = _fmix32(np.frombuffer(b"".join(parts), dtype="<u4").astype(np.uint32))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out = np.tile(self.empty, (len(texts), 1))
        i = 0
        while i < len(texts):
            # a group of documents whose shingles fit one [chunk, num_perm] temporary (at least one doc)
            j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + chunk, side="right")) - 1)
            lo, hi = offsets[i], offsets[j]
            if j == i + 1 and hi - lo > chunk:  # one long document: fold its shingles chunk by chunk
                for s in range(lo, hi, chunk):
                    out[i] = np.minimum(out[i], self._permute(hv[s : min(s + chunk, hi)]).min(axis=0))
            elif hi > lo:
                nz = np.flatnonzero(counts[i:j]) + i
                mins = np.minimum.reduceat(self._permute(hv[lo:hi]), offsets[nz] - lo, axis=0)
                out[nz] = np.minimum(out[nz], mins)
            i = j
        return out

    def _permute(self, hv: np.ndarray) -> np.ndarray:
        return hv[:, None] * self.a[None, :] + self.b[None, :]  # uint32 arithmetic wraps: mod 2^32


def _redis_storage(url: str, default_basename: str) -> tuple[dict, dict]:
    u = urlparse(url)
    q = parse_qs(u.query)
    conn = {"host": u.hostname or "localhost", "port": u.port or 6379}
    if u.path.strip("/"):
        conn["db"] = int(u.path.strip("/"))
    basename = q.get("basename", [default_basename])[0]
    return {"type": "redis", "basename": basename.encode(), "redis": conn}, conn


class NearDupIndex:
    """Sequential near-duplicate decisions: `check_and_add(key, sig)` -> (dup_of or None, jaccard)."""

    def __init__(self, cfg: MinHashConfig, lsh_url: str | None = None, basename: str = "cpt_curate"):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self._redis = None
        storage = None
        if lsh_url:
            import redis

            storage, conn = _redis_storage(lsh_url, basename)
            self._redis = redis.Redis(**conn)
            try:
                self._redis.ping()
            except redis.exceptions.ConnectionError as e:
                raise CptError(f"cannot reach redis at {lsh_url}: {e}; start redis-server or drop --lsh") from e
            self._sig_key = storage["basename"] + b"_sig"
            # A run owns its basename: stale keys from an earlier run would change decisions.
            for k in self._redis.scan_iter(match=storage["basename"] + b"*"):
                self._redis.delete(k)
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, storage_config=storage)
        self._sigs: dict[str, np.ndarray] = {}
        from datasketch import LeanMinHash

        self._lean = LeanMinHash

    def _lean_of(self, sig: np.ndarray):
        return self._lean(seed=self.cfg.seed, hashvalues=sig, scheme="affine32")

    def _get_sigs(self, keys: list[str]) -> list[np.ndarray]:
        if self._redis is None:
            return [self._sigs[k] for k in keys]
        raw = self._redis.hmget(self._sig_key, keys)
        return [np.frombuffer(r, dtype=np.uint32) for r in raw]

    def check_and_add(self, key: str, sig: np.ndarray) -> tuple[str | None, float]:
        m = self._lean_of(sig)
        cands = sorted(self.lsh.query(m))
        best, best_j = None, 0.0
        if cands:
            if self.cfg.verify == "none":
                return cands[0], 1.0
            for k, s in zip(cands, self._get_sigs(cands)):
                j = float(np.count_nonzero(s == sig)) / len(sig)
                if j > best_j or (j == best_j and best is None):
                    best, best_j = k, j
            if best_j >= self.cfg.threshold:
                return best, best_j
        self.lsh.insert(key, m, check_duplication=False)
        if self._redis is None:
            self._sigs[key] = sig
        else:
            self._redis.hset(self._sig_key, key, sig.tobytes())
        return None, best_j

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
