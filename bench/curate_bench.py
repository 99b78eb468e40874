"""Near-dup stage: ours vs the datasketch tutorial loop vs rensa's per-document loop, one process, same
corpus, decisions checked against exact Jaccard.

    python bench/curate_bench.py [--corpus ../shared/data/domain/medquad_qa.txt --sep '^# '] [--json]
    # whole processes: `cpt curate` (near-dup stage only) vs datatrove 0.10.1's MinHash pipeline, -j 1 and 2
    python bench/curate_bench.py --processes [--workers 1,2] [--repeat 3] [--tools ours,ours-bands,datatrove,tutorial]
    python bench/curate_bench.py --processes --corpus ../shared/data/domain/cuad_contracts.txt --sep '\n' --min-words 30

Every method gets the raw documents and returns the set it removes at threshold 0.8 (a removed document
is never inserted, so "earlier kept document" is the semantics everywhere); shingling is timed.
- tutorial loop: one datasketch `MinHash()` per document updated shingle by shingle, `MinHashLSH.query`,
  candidates confirmed by estimated Jaccard >= threshold, then `insert`.
- rensa loop: the same loop with rensa's `RMinHash` / `RMinHashLSH` (Rust; 16 bands x 8 rows), shingles
  built in Python as its README does.
- ours: `cpt_megatron.curate.dedup` (numpy shingle hashes + one-permutation sketch, prefix-index
  candidates, exact Jaccard decides), the same with `candidates: bands` (high-recall LSH, the former
  path) and with `decide: estimate`.
`--processes`: each tool runs as its own process on the same JSONL files (W files for W workers, the
corpus cut into contiguous runs, not timed): ours is `tools/curate.py --stages minhash_dedup -j W`
(reads, decides, writes gzip shards and report.json), datatrove is its 4-stage MinHash example
(signatures, buckets, cluster, filter; `LocalPipelineExecutor` with W tasks/workers, 5-gram shingles,
`--dt-buckets` x `--dt-rows`, default 12 x 10: ~0.78 target, without writing the kept documents), and
`tutorial` is the tutorial loop below in a process of its own (reads the JSONL; once, at -j 1). Wall
time and peak RSS of the largest process (`/usr/bin/time`: the process and the workers it reaped) per run, runs
alternated, the fastest of `--repeat` counts; removed ids scored against the same brute-force truth.
Ground truth: exact Jaccard greedy over ALL earlier kept documents (brute force, with the size bound).
Time is CPU time of this process (the machine is shared; wall time is printed too); each method but the
tutorial loop (~40 s a run) runs `--repeat` times and the fastest run counts, as `timeit` does.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt_megatron.curate.config import MinHashConfig  # noqa: E402
from cpt_megatron.curate.dedup import (  # noqa: E402
    MinHasher,
    NearDupIndex,
    brute_force_removed,
    shingles,
    uses_prefix,
)

DEFAULT = Path(os.environ.get("CPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data")) / "domain/medquad_qa.txt"


def load(path: Path, sep: str, min_words: int = 0) -> list[str]:
    """Documents of a plain-text corpus: split before each line matching `sep` (^...) or at `sep`; with
    min_words only those of at least that many words (CUAD paragraphs: sep '\\n', min_words 30)."""
    text = path.read_text(encoding="utf-8")
    docs = [d for d in re.split(f"(?m)(?={sep.lstrip('^')})" if sep.startswith("^") else sep, text) if d.strip()]
    return [d for d in docs if len(d.split()) >= min_words] if min_words else docs


def _write_inputs(docs: list[str], folder: Path, files: int) -> None:
    """The corpus as `files` JSONL files of contiguous documents (ids = corpus index), for both tools."""
    folder.mkdir(parents=True)
    for k in range(files):
        lo, hi = k * len(docs) // files, (k + 1) * len(docs) // files
        with open(folder / f"part-{k:03d}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": str(i), "text": docs[i]}) + "\n" for i in range(lo, hi))


def _run_process(cmd: list[str], cwd: Path) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB of the largest of the process and the workers it reaped, CPU s user + system of
    the process and its workers). Under /usr/bin/time where present: a child forked from this (large)
    process starts with its resident size on record."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        timed = ["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file.name, *cmd] if os.path.exists("/usr/bin/time") else cmd
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(timed, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-2000:]}")
        if timed is not cmd:
            kib, user, system = rss_file.read().split()[-3:]
            return wall, int(kib) / 1024, float(user) + float(system)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, after.ru_maxrss / 1024, cpu


def _ours_removed(out: Path) -> set[int]:
    removed = set()
    for f in (out / "rejected").glob("minhash_dedup-*.jsonl.gz"):
        with gzip.open(f, "rt") as fh:
            removed.update(int(json.loads(line)["id"]) for line in fh)
    return removed


def datatrove_child(inp: Path, work: Path, workers: int, buckets: int, rows: int) -> None:
    """datatrove's MinHash example pipeline; writes the kept ids to work/kept-RANK.txt."""
    import xxhash
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    if not isinstance(getattr(xxhash, "_cpt_shim", None), bool):  # xxhash >= 4 refuses the str datatrove 0.10.1 hashes
        raw = xxhash.xxh64_intdigest
        xxhash.xxh64_intdigest = lambda d, seed=0: raw(d.encode("utf-8", "surrogatepass") if isinstance(d, str) else d, seed)
        xxhash._cpt_shim = True
    cfg = MinhashConfig(n_grams=5, num_buckets=buckets, hashes_per_bucket=rows)

    def kept(data, rank: int = 0, world_size: int = 1):
        with open(work / f"kept-{rank:03d}.txt", "w") as f:
            for doc in data:
                f.write(doc.id + "\n")
                yield doc

    def reader(data, rank: int = 0, world_size: int = 1):  # file `rank` (JsonlReader would need orjson)
        with open(inp / f"part-{rank:03d}.jsonl") as f:
            for line in f:
                d = json.loads(line)
                yield Document(text=d["text"], id=d["id"])

    class Words(WordTokenizer):  # words as str.split() gives them, as ours (its default English one needs spacy)
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    signature = MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg, language=Words())
    logs = str(work / "logs")
    sig = LocalPipelineExecutor([reader, signature],
                                tasks=workers, workers=workers, logging_dir=logs + "/1", start_method="fork")
    bkt = LocalPipelineExecutor([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"),
                                                     config=cfg)], tasks=buckets, workers=workers,
                                logging_dir=logs + "/2", depends=sig, start_method="fork")
    clu = LocalPipelineExecutor([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"),
                                                     config=cfg)], tasks=1, logging_dir=logs + "/3", depends=bkt,
                                start_method="fork")
    flt = LocalPipelineExecutor([reader, MinhashDedupFilter(input_folder=str(work / "remove")), kept],
                                tasks=workers, workers=workers, logging_dir=logs + "/4", depends=clu,
                                start_method="fork")
    flt.run()


def tutorial_child(inp: Path, work: Path, thr: float) -> None:
    """The datasketch tutorial loop as a process of its own: reads the JSONL files, writes the removed ids."""
    docs = [json.loads(line) for f in sorted(inp.glob("part-*.jsonl")) for line in open(f)]
    removed = tutorial([d["text"] for d in docs], thr)
    (work / "removed.txt").write_text("".join(f"{docs[i]['id']}\n" for i in sorted(removed)))


def processes(docs: list[str], truth: set[int], workers: list[int], repeat: int, buckets: int, rows: int,
              tools: tuple[str, ...] = ("ours", "datatrove"), thr: float = 0.8) -> dict:
    """Whole-process runs of `tools` (ours, ours-bands: `candidates: bands`, datatrove, tutorial: the
    datasketch tutorial loop, one process, run once at -j 1: ~25 s), alternated; the fastest of `repeat` per
    (tool, workers)."""
    repo = Path(__file__).resolve().parents[1]
    rows_out: dict = {}
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        tmp = Path(tmp)
        for w in workers:
            _write_inputs(docs, tmp / f"in{w}", w)
        tools = [t for t in tools if t != "datatrove"] + [t for t in tools if t == "datatrove"][:1]
        try:
            import datatrove  # noqa: F401
        except ImportError:
            if "datatrove" in tools:
                print("(datatrove not installed: pip install -e '.[bench]')")
                tools.remove("datatrove")
        (tmp / "ours.yaml").write_text("rejected_samples: 100000000\n")
        (tmp / "ours-bands.yaml").write_text("rejected_samples: 100000000\nminhash_dedup: {candidates: bands}\n")
        for r in range(repeat):
            for w in workers:
                for tool in tools:
                    if tool == "tutorial" and (w != 1 or r):
                        continue
                    out = tmp / f"{tool}-{w}-{r}"
                    if tool == "tutorial":
                        cmd = [sys.executable, __file__, "--tutorial-child", str(tmp / f"in{w}"), str(out), str(thr)]
                        out.mkdir()
                    elif tool.startswith("ours"):
                        cmd = [sys.executable, str(repo / "tools/curate.py"), "-i", str(tmp / f"in{w}"), "-o", str(out),
                               "--stages", "minhash_dedup", "-j", str(w), "-c", str(tmp / f"{tool}.yaml")]
                    else:
                        cmd = [sys.executable, __file__, "--datatrove-child", str(tmp / f"in{w}"), str(out),
                               str(w), str(buckets), str(rows)]
                        out.mkdir()
                    wall, rss, cpu = _run_process(cmd, repo)
                    if tool.startswith("ours"):
                        removed = _ours_removed(out)
                    elif tool == "tutorial":
                        removed = {int(x) for x in (out / "removed.txt").read_text().split()}
                    else:
                        kept = {int(x) for f in out.glob("kept-*.txt") for x in f.read_text().split()}
                        removed = set(range(len(docs))) - kept
                    shutil.rmtree(out)
                    key = f"{tool} -j {w}"
                    best = rows_out.get(key)
                    tp = len(removed & truth)
                    row = {"tool": tool, "workers": w, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                           "peak_rss_mib": round(rss),
                           "removed": len(removed), "precision": round(tp / max(1, len(removed)), 4),
                           "recall": round(tp / max(1, len(truth)), 4)}
                    if best is None or wall < best["wall_s"]:
                        row["walls"] = (best or {}).get("walls", []) + [round(wall, 2)]
                        row["cpus"] = (best or {}).get("cpus", []) + [round(cpu, 2)]
                        rows_out[key] = row
                    else:
                        best["walls"].append(round(wall, 2))
                        best["cpus"].append(round(cpu, 2))
    print(f"{'run':<18} {'wall min':>8} {'median':>7} {'cpu min':>7} {'all walls':>26} {'peak MiB':>9} {'removed':>8} "
          f"{'precision':>9} {'recall':>7}")
    for key, r in rows_out.items():
        r["median_wall_s"], r["min_cpu_s"] = round(statistics.median(r["walls"]), 2), min(r["cpus"])
        print(f"{key:<18} {r['wall_s']:>8.2f} {r['median_wall_s']:>7.2f} {r['min_cpu_s']:>7.2f} {str(r['walls']):>26} "
              f"{r['peak_rss_mib']:>9} {r['removed']:>8} {r['precision']:>9.4f} {r['recall']:>7.4f}")
    for w in workers:  # datatrove / ours: wall (min, median) and CPU (min)
        dt, us = rows_out.get(f"datatrove -j {w}"), rows_out.get(f"ours -j {w}")
        if dt and us:
            print(f"-j {w}: datatrove / ours = {dt['wall_s'] / us['wall_s']:.2f}x wall (min), "
                  f"{dt['median_wall_s'] / us['median_wall_s']:.2f}x (median), {dt['min_cpu_s'] / us['min_cpu_s']:.2f}x CPU")
    tu, us = rows_out.get("tutorial -j 1"), rows_out.get("ours -j 1")
    if tu and us:
        print(f"-j 1: tutorial loop / ours = {tu['wall_s'] / us['wall_s']:.1f}x wall (ours fastest of {repeat}), "
              f"{tu['cpu_s'] / us['min_cpu_s']:.1f}x CPU")
    return rows_out


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


def ours(docs: list[str], thr: float, decide: str = "exact", batch: int = 256, stats: dict | None = None,
         candidates: str = "prefix") -> set[int]:
    cfg = MinHashConfig(threshold=thr, decide=decide, candidates=candidates)
    hasher, index = MinHasher(cfg, sketch=not uses_prefix(cfg)), NearDupIndex(cfg)  # as the pipeline
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
    ap.add_argument("--min-words", type=int, default=0, help="keep documents of at least N words (CUAD paragraphs: 30)")
    ap.add_argument("--processes", action="store_true", help="whole processes: cpt curate vs datatrove")
    ap.add_argument("--workers", default="1,2", help="--processes: worker counts")
    ap.add_argument("--tools", default="ours,datatrove", help="--processes: of ours, ours-bands, datatrove, tutorial")
    ap.add_argument("--dt-buckets", type=int, default=12)
    ap.add_argument("--dt-rows", type=int, default=10)
    ap.add_argument("--datatrove-child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--tutorial-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tutorial_child:
        inp, work, thr = args.tutorial_child
        return tutorial_child(Path(inp), Path(work), float(thr))
    if args.datatrove_child:
        inp, work, w, b, r = args.datatrove_child
        return datatrove_child(Path(inp), Path(work), int(w), int(b), int(r))
    if not args.corpus.is_file():
        sys.exit(f"corpus {args.corpus} not found (see ../shared/data/README.md)")
    docs = load(args.corpus, args.sep.encode().decode("unicode_escape"), args.min_words)
    if args.limit:
        docs = docs[: args.limit]
    thr = args.threshold
    print(f"corpus {args.corpus.name}: {len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.1f}M chars")
    truth = brute_force_removed(docs, MinHashConfig(threshold=thr))
    print(f"exact Jaccard >= {thr} to an earlier kept document (brute force): {len(truth)}")
    if args.processes:
        rows = processes(docs, truth, [int(w) for w in args.workers.split(",")], max(1, args.repeat),
                         args.dt_buckets, args.dt_rows, tuple(args.tools.split(",")), thr)
        if args.json:
            print(json.dumps({"docs": len(docs), "exact_truth": len(truth), "rows": rows}))
        return
    stats: dict = {}
    band_stats: dict = {}
    methods = [("tutorial loop", lambda: tutorial(docs, thr))]
    try:
        import rensa  # noqa: F401

        methods.append(("rensa loop", lambda: rensa_loop(docs, thr)))
    except ImportError:
        print("(rensa not installed: pip install -e '.[bench]')")
    methods += [("ours (exact)", lambda: ours(docs, thr, "exact", stats=stats)),
                ("ours (bands)", lambda: ours(docs, thr, "exact", stats=band_stats, candidates="bands")),
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
    print(f"ours (bands) report: {json.dumps(band_stats)}")
    if args.json:
        print(json.dumps({"docs": len(docs), "exact_truth": len(truth), "rows": rows, "near_dup": stats,
                          "near_dup_bands": band_stats}))


if __name__ == "__main__":
    main()
