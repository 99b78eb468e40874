"""MinHash + LSH near-dup stage: the datasketch tutorial loop vs ours, one process, same corpus.

    python bench/curate_bench.py [--corpus ../shared/data/domain/medquad_qa.txt --sep '^# ']

Tutorial loop: one `MinHash()` per document updated shingle by shingle, `MinHashLSH.query` then
`insert`. Both sides use word 5-gram shingles (shingling timed), 128 permutations, threshold 0.8, and
verify candidates (estimated Jaccard >= threshold; the tutorial via `MinHash.jaccard`); a removed
document is not inserted. Prints docs/s of each, the ratio, and whether both removed the same documents.
The unverified tutorial count ("has any LSH candidate") is printed for context.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt_megatron.curate.config import MinHashConfig  # noqa: E402
from cpt_megatron.curate.dedup import MinHasher, NearDupIndex, shingles  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/domain/medquad_qa.txt"


def load(path: Path, sep: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d for d in re.split(f"(?m)(?={sep.lstrip('^')})" if sep.startswith("^") else sep, text) if d.strip()]


def tutorial(docs: list[str], thr: float, verify: bool = True) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=thr, num_perm=128)
    sigs, removed = {}, set()
    for i, d in enumerate(docs):
        m = MinHash(num_perm=128)
        for s in shingles(d):
            m.update(s)
        cands = lsh.query(m)
        if verify:
            if any(sigs[c].jaccard(m) >= thr for c in cands):
                removed.add(i)
                continue
        elif cands:
            removed.add(i)
        lsh.insert(i, m)
        sigs[i] = m
    return removed


def ours(docs: list[str], thr: float, batch: int = 256) -> set[int]:
    cfg = MinHashConfig(threshold=thr)
    hasher, index = MinHasher(cfg), NearDupIndex(cfg)
    removed = set()
    for b in range(0, len(docs), batch):
        for k, sig in enumerate(hasher.signatures(docs[b : b + batch])):
            if index.check_and_add(str(b + k), sig)[0] is not None:
                removed.add(b + k)
    return removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT)
    ap.add_argument("--sep", default="^# ", help="document separator regex (line start)")
    ap.add_argument("--limit", type=int, default=0, help="first N documents only (0 = all)")
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"corpus {args.corpus} not found (see ../shared/data/README.md)")
    docs = load(args.corpus, args.sep)
    if args.limit:
        docs = docs[: args.limit]
    print(f"corpus {args.corpus.name}: {len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.1f}M chars")
    rows = {}
    for name, fn in (("tutorial loop", lambda: tutorial(docs, args.threshold)), ("ours", lambda: ours(docs, args.threshold))):
        t = time.perf_counter()
        removed = fn()
        dt = time.perf_counter() - t
        rows[name] = (len(docs) / dt, removed)
        print(f"{name:14s} {len(docs) / dt:9.0f} docs/s  {dt:7.2f} s  removed {len(removed)}")
    ratio = rows["ours"][0] / rows["tutorial loop"][0]
    same = rows["ours"][1] == rows["tutorial loop"][1]
    print(f"ratio {ratio:.1f}x; same removed documents: {same}")
    print(f"(unverified tutorial, 'has an LSH candidate': {len(tutorial(docs, args.threshold, verify=False))} flagged)")


if __name__ == "__main__":
    main()
