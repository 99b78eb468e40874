"""`cpt curate`: normalize, filter, deduplicate and redact a corpus into gzipped JSONL shards."""

from __future__ import annotations

import sys

from cpt_megatron.cli._types import positive_int

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "curate",
        parents=[subparsers.common],
        help="curate a corpus: normalize, filter, exact + MinHash dedup, PII (writes shards + report.json)",
        description="Stages in order: normalize, langid, length, quality, exact_dedup, minhash_dedup, perplexity, pii. "
        "Plain-text inputs: each file is one document unless --doc-separator splits it. The output shards "
        "(OUT/*.jsonl.gz) are what `cpt preprocess` reads.",
    )
    p.add_argument("--input", "-i", action="append", required=True, help="JSONL(.gz/.zst), Parquet, text file or directory (repeatable); a plain-text "
                   "file is ONE document unless --doc-separator is given")
    p.add_argument("--out", "-o", required=True, help="output folder (shards, report.json, rejected/)")
    p.add_argument("--config", "-c", help="YAML recipe (see recipes/curate/)")
    p.add_argument("--stages", help="comma list of stages to run (default: the recipe's, else all but langid/perplexity)")
    p.add_argument("--workers", "-j", type=positive_int, default=1, help="processes for per-document stages (output is identical for any N)")
    p.add_argument("--memory-mb", type=float, help="peak resident memory per process in MiB (default: the recipe's "
                   "memory_mb, 80; 0 = unbounded): batches, hashing and the near-dup index are sized to it, outputs unchanged")
    p.add_argument("--lsh", help="redis://host:port[/db][?basename=NAME] for a Redis-backed LSH index (default: in memory)")
    p.add_argument("--doc-separator", help="regex matching the first line of each document in plain-text inputs, e.g. '^# ' "
                   "(without it each text file is one document)")
    p.add_argument("--text-field", help="JSONL/Parquet text field (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g = p.add_argument_group("many tasks (docs/curate.md: Curating on many nodes); same output as without --shards")
    g.add_argument("--shards", type=positive_int, help="split the inputs into N shards (by file) and run the staged "
                   "executor: sketch (N tasks) -> buckets (N tasks) -> write (1 task)")
    g.add_argument("--stage", default="all", choices=["all", "sketch", "buckets", "write"],
                   help="stage to run (default all, in order); done tasks are skipped")
    g.add_argument("--task", type=int, help="run only this task of --stage (a Slurm array task: $SLURM_ARRAY_TASK_ID); "
                   "default: every task, one after another")
    g.add_argument("--work", help="folder for the stages' outputs, on a filesystem every task sees (default: OUT.work)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def run(args) -> dict:
    from cpt_megatron.curate import curate, load_config
    from cpt_megatron.runtime.procs import keep_freed_heap

    keep_freed_heap()  # this process and its workers loop over array temporaries
    overrides: dict = {}
    if args.stages:
        overrides["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.lsh:
        overrides["lsh"] = args.lsh
    if args.memory_mb is not None:
        overrides["memory_mb"] = args.memory_mb or None
    if args.doc_separator:
        overrides.setdefault("input", {})["doc_separator"] = args.doc_separator
    if args.text_field:
        overrides.setdefault("input", {})["text_field"] = args.text_field
    cfg = load_config(args.config, overrides)
    if cfg.input.doc_separator is None:
        from pathlib import Path

        from cpt_megatron.curate.readers import is_plain_text

        for path in args.input:
            if is_plain_text(path) and Path(path).stat().st_size > 64 << 10:
                print(f"cpt curate: warning: {path} is plain text and is read as ONE document (no --doc-separator); "
                      "pass a regex for the first line of each document, e.g. --doc-separator '^# '", file=sys.stderr)
    if args.shards is None and (args.stage != "all" or args.task is not None or args.work):
        from cpt_megatron.errors import CptError

        raise CptError("--stage/--task/--work need --shards N (the staged executor)")
    if args.shards is not None:
        return _run_staged(args, cfg)
    res = curate(args.input, args.out, cfg, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    for line in res.report["malformed_records"][:5]:
        print(f"cpt curate: malformed: {line}", file=sys.stderr)
    if not args.json:
        removed = ", ".join(f"{k} {v}" for k, v in res.removed.items())
        print(f"read {res.read}, kept {res.kept}, malformed {res.malformed}; removed: {removed}; out {res.out}")
        nd = res.report.get("near_dup")
        if nd:
            print(f"near-dup ({nd['decide']}, {nd['bands']}x{nd['rows']} LSH): {nd['candidate_pairs']} candidate pairs, "
                  f"{nd['checked_pairs']} checked, {nd['verified_pairs']} verified, {nd['removed']} removed")
    return {
        "read": res.read,
        "kept": res.kept,
        "malformed": res.malformed,
        "removed": res.removed,
        "out": res.out,
        "elapsed_s": res.report["elapsed_s"],
        "near_dup": res.report.get("near_dup"),
    }


def _run_staged(args, cfg) -> dict:
    from cpt_megatron.curate.distributed import run_stage

    r = run_stage(args.input, args.out, cfg, args.shards, stage=args.stage, task=args.task, work=args.work,
                  workers=args.workers, overwrite=args.overwrite)
    rep = r["report"]
    if not args.json:
        print(f"stage {args.stage}: ran {', '.join(r['done']) or 'nothing'}; skipped (done) {len(r['skipped'])}; "
              f"work {r['work']}")
        if rep:
            removed = ", ".join(f"{k} {v}" for k, v in rep["removed"].items())
            print(f"read {rep['read']}, kept {rep['kept']}, malformed {rep['malformed']}; removed: {removed}; "
                  f"out {args.out}")
    out = {"stage": args.stage, "done": r["done"], "skipped": r["skipped"], "work": r["work"], "out": str(args.out)}
    if rep:
        out.update({k: rep[k] for k in ("read", "kept", "malformed", "removed", "elapsed_s")})
        out["near_dup"] = rep.get("near_dup")
    return out
