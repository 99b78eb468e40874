"""Near-dup stage: ours vs the datasketch tutorial loop vs rensa's per-document loop, one process, same
corpus, decisions checked against exact Jaccard.

    python bench/curate_bench.py [--corpus ../shared/data/domain/medquad_qa.txt --sep '^# '] [--json]

Every method gets the raw documents and returns the set it removes at threshold 0.8 (a removed document
is never inserted, so "earlier kept document" is the semantics everywhere); shingling is timed.
- tutorial loop: one datasketch `MinHash()` per document updated shingle by shingle, `MinHashLSH.query`,
  candidates confirmed by estimated Jaccard >= threshold, then `insert`.
- rensa loop: the same loop with rensa's `RMinHash` / `RMinHashLSH` (Rust; 16 bands x 8 rows), shingles
  built in Python as its README does.
- ours: `cpt_megatron.curate.dedup` (numpy shingle hashes + one-permutation sketch, high-recall LSH,
  exact Jaccard decides), and the same with `decide: estimate`.
Ground truth: exact Jaccard greedy over ALL earlier kept documents (brute force, with the size bound).
Time is CPU time of this process (the machine is shared; wall time is printed too); each method but the
tutorial loop (~40 s a run) runs `--repeat` times and the fastest run counts, as `timeit` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt_megatron.curate.config import MinHashConfig  # noqa: E402
from cpt_megatron.curate.dedup import MinHasher, NearDupIndex, brute_force_removed, shingles  # noqa: E402

DEFAULT = Path(os.environ.get("CPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data")) / "domain/medquad_qa.txt"


def load(path: Path, sep: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d for d in re.split(f"(?m)(?={sep.lstrip('^')})" if sep.startswith("^") else sep, text) if d.strip()]


def _shingle_strs(d: str) -> list[str]:
    return [" ".join(s) for s in shingles(d)]


def _per_doc_loop(docs: list[str], thr: float, sketch, lsh) -> set[int]:
    """The README loop: sketch each document, query, confirm by estimated Jaccard, insert if kept."""
    sigs, removed = {}, set()
    for i, d in enumerate(docs):
        m = sketch(_shingle_strs(d))
        if any(sigs[c].jaccard(m) >= thr for c in lsh.query(m)):
            removed.add(i)
            continue
        lsh.insert(i, m)
        sigs[i] = m
    return removed


def tutorial(docs: list[str], thr: float) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    def sketch(sh):
        m = MinHash(num_perm=128)
        for s in sh:  # one update per shingle, as datasketch's tutorial does
            m.update(s.encode("utf-8"))
        return m

    return _per_doc_loop(docs, thr, sketch, MinHashLSH(threshold=thr, num_perm=128))


def rensa_loop(docs: list[str], thr: float) -> set[int]:
    from rensa import RMinHash, RMinHashLSH

    def sketch(sh):
        m = RMinHash(num_perm=128, seed=42)
        m.update(sh)
        return m

    return _per_doc_loop(docs, thr, sketch, RMinHashLSH(threshold=thr, num_perm=128, num_bands=16))


def ours(docs: list[str], thr: float, decide: str = "exact", batch: int = 256, stats: dict | None = None) -> set[int]:
    cfg = MinHashConfig(threshold=thr, decide=decide)
    hasher, index = MinHasher(cfg), NearDupIndex(cfg)
    removed = set()
    try:
        for b in range(0, len(docs), batch):
            values, offsets = hasher.hash_sets(docs[b : b + batch])
            keys = [str(i) for i in range(b, b + len(offsets) - 1)]
            for k, (dup_of, _) in enumerate(index.check_batch(keys, hasher.signatures(values, offsets), values, offsets)):
                if dup_of is not None:
                    removed.add(b + k)
    finally:
        index.close()
    if stats is not None:
        stats.update(index.stats.as_dict())
    return removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT)
    ap.add_argument("--sep", default="^# ", help="document separator regex (line start)")
    ap.add_argument("--limit", type=int, default=0, help="first N documents only (0 = all)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--repeat", type=int, default=5, help="runs per fast method; the fastest counts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"corpus {args.corpus} not found (see ../shared/data/README.md)")
    docs = load(args.corpus, args.sep)
    if args.limit:
        docs = docs[: args.limit]
    thr = args.threshold
    print(f"corpus {args.corpus.name}: {len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.1f}M chars")
    truth = brute_force_removed(docs, MinHashConfig(threshold=thr))
    print(f"exact Jaccard >= {thr} to an earlier kept document (brute force): {len(truth)}")
    stats: dict = {}
    methods = [("tutorial loop", lambda: tutorial(docs, thr))]
    try:
        import rensa  # noqa: F401

        methods.append(("rensa loop", lambda: rensa_loop(docs, thr)))
    except ImportError:
        print("(rensa not installed: pip install -e '.[bench]')")
    methods += [("ours (exact)", lambda: ours(docs, thr, "exact", stats=stats)),
                ("ours (estimate)", lambda: ours(docs, thr, "estimate"))]
    rows = {}
    for name, fn in methods:
        best = None
        for _ in range(1 if name == "tutorial loop" else max(1, args.repeat)):
            w, c = time.perf_counter(), time.process_time()
            removed = fn()
            run = (time.process_time() - c, time.perf_counter() - w)
            best = run if best is None or run < best else best
        cpu, wall = best
        tp = len(removed & truth)
        rows[name] = {"docs_per_cpu_s": round(len(docs) / cpu), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                      "removed": len(removed), "precision": round(tp / max(1, len(removed)), 4),
                      "recall": round(tp / max(1, len(truth)), 4)}
    base = rows["tutorial loop"]["docs_per_cpu_s"]
    print(f"{'method':<16} {'docs/cpu-s':>10} {'vs tutorial':>11} {'cpu s':>7} {'wall s':>7} {'removed':>8} "
          f"{'precision':>9} {'recall':>7}")
    for name, r in rows.items():
        r["vs_tutorial"] = round(r["docs_per_cpu_s"] / base, 1)
        print(f"{name:<16} {r['docs_per_cpu_s']:>10,} {r['vs_tutorial']:>10.1f}x {r['cpu_s']:>7.2f} {r['wall_s']:>7.2f} "
              f"{r['removed']:>8} {r['precision']:>9.4f} {r['recall']:>7.4f}")
    print(f"ours (exact) report: {json.dumps(stats)}")
    if args.json:
        print(json.dumps({"docs": len(docs), "exact_truth": len(truth), "rows": rows, "near_dup": stats}))


if __name__ == "__main__":
    main()
