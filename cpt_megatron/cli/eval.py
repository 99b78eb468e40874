"""`cpt eval`: perplexity / bits per byte per held-out file, and lm-eval benchmarks, of an HF model or a
megatron checkpoint (any TP/PP, no export)."""

from __future__ import annotations

from cpt_megatron.cli._types import nonneg_int, positive_int, tokenizer_spec

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", parents=[subparsers.common],
                              help="perplexity per held-out file and lm-eval benchmarks (HF model or megatron checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="megatron-core checkpoint directory (cpt import-hf / cpt train)")
    src.add_argument("--hf", help="HF model directory (transformers, fp32; benchmarks via lm-eval's own hf model)")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help=".txt (one document) or .jsonl (one document per line) files; source name = file stem")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks, comma-separated: registry names (hellaswag,arc_easy,mmlu; datasets from the "
                        "local cache, never downloaded) or paths of task YAML files / folders of them")
    p.add_argument("--benchmark-data", default=None, metavar="DIR",
                   help="read every task's data from local JSONL, DIR/<task>/<split>.jsonl in the Hub dataset's "
                        "columns (MMLU: DIR/mmlu/<subject>/), with lm-eval's own prompts and metrics "
                        "(docs/benchmarks.md)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (lm-eval --limit; < 1 = a fraction); for a group, per subtask")
    p.add_argument("--num-fewshot", type=nonneg_int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--output", default=None, metavar="FILE", help="write lm-eval's results JSON here")
    p.add_argument("--log-samples", action="store_true", help="include per-document responses in --output")
    p.add_argument("--batch-size", type=positive_int, default=16, help="lm-eval requests per scoring call")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="context length for benchmarks (default: the model's max_position_embeddings)")
    p.add_argument("--group", choices=("general", "domain"), default="general", help="group of the --data sources")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")
    p.add_argument("--seq-len", type=positive_int, default=512, help="window length in tokens (labels per window)")
    p.add_argument("--micro-batch", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="evaluate only the first N tokens of each file")
    p.add_argument("--tokenizer", type=tokenizer_spec, default=None, help="tokenizer (default: the model's / checkpoint's own)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size (--ckpt)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size (--ckpt)")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="local processes to spawn with torchrun (--ckpt; default tp*pp when not under a launcher)")
    p.set_defaults(func=run)


def _print(res: dict) -> None:
    from cpt_megatron.eval.tasks import format_summary

    for name, r in res.get("results", {}).items():
        bpb = "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
        se = "" if r.get("loss_stderr") is None else f" ± {r['loss_stderr']:.5f}"
        print(f"{name:<24} {r['group']:<8} ppl {r['ppl']:10.4f}  loss {r['loss']:.5f}{se}  tokens {r['tokens']:>8}  "
              f"bits/byte {bpb}", flush=True)
    for line in format_summary(res.get("benchmarks", {})):
        print(line, flush=True)


def _check_inputs(args) -> list[str]:
    """Everything checkable before a model loads (issue: a missing --data file failed after the load)."""
    from pathlib import Path

    from cpt_megatron.errors import CptError

    if not args.data and not args.tasks:
        raise CptError("nothing to evaluate: give --data FILE... (perplexity) and/or --tasks T1,T2 (lm-eval benchmarks)")
    for f in args.data:
        p = Path(f)
        if not p.is_file():
            raise CptError(f"--data {f}: {'is a directory' if p.is_dir() else 'file not found'} (give .txt or .jsonl files)")
        with open(p, "rb") as fh:
            head = fh.read(1 << 16)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not just a character cut at the 64 KiB boundary
                raise CptError(f"--data {f}: not UTF-8 text (byte {e.start}); give .txt or .jsonl files") from e
    for name, v in (("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch), ("--batch-size", args.batch_size),
                    ("--tp", args.tp), ("--pp", args.pp)):
        if v < 1:
            raise CptError(f"{name}={v}: must be >= 1")
    if args.limit is not None and args.limit <= 0:
        raise CptError(f"--limit={args.limit}: must be > 0 (a count, or a fraction < 1)")
    if args.hf and (args.nproc or args.tp > 1 or args.pp > 1):
        raise CptError("--tp/--pp/--nproc apply to --ckpt; --hf runs one transformers process")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None:
        from cpt_megatron.eval.tasks import resolve_tasks

        resolve_tasks(tasks)
    if args.benchmark_data is not None:
        if not tasks:
            raise CptError("--benchmark-data needs --tasks (e.g. --tasks arc_easy,hellaswag,piqa,sciq)")
        from cpt_megatron.eval.tasks import check_benchmark_data

        check_benchmark_data(tasks, args.benchmark_data)  # every file there before a model loads
    if args.ckpt:
        from cpt_megatron.eval.standalone import checkpoint_tokenizer

        checkpoint_tokenizer(args.ckpt, args.tokenizer)
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise CptError(f"--output {args.output}: its folder does not exist")
    return tasks


def _bench_kw(args) -> dict:
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    return dict(limit=limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, max_length=args.max_length,
                log_samples=args.log_samples, benchmark_data=args.benchmark_data)


def _write_output(path: str, lm_eval_res: dict) -> None:
    import json

    from lm_eval.utils import handle_non_serializable

    from cpt_megatron.utils import atomic_file

    with atomic_file(path) as f:
        json.dump(lm_eval_res, f, indent=2, default=handle_non_serializable, ensure_ascii=False)


def run(args) -> dict | None:
    tasks = _check_inputs(args)
    common = dict(seq_len=args.seq_len, micro_batch=args.micro_batch, max_tokens=args.max_tokens, group=args.group,
                  tokenizer=args.tokenizer, text_key=args.text_key)
    if args.hf:
        from cpt_megatron.eval.standalone import benchmark_hf, evaluate_hf

        res = evaluate_hf(args.hf, args.data, **common) if args.data else {"results": {}, "model": args.hf}
        if tasks:
            bench = benchmark_hf(args.hf, tasks, **_bench_kw(args))
            res["benchmarks"] = bench["summary"]
            if args.output:
                _write_output(args.output, bench["lm_eval"])
                res["output"] = args.output
        _print(res)
        return res
    from cpt_megatron.runtime.launch import relaunched

    if relaunched(args.nproc, default=args.tp * args.pp):
        return None  # rank 0 of the children printed the results
    from cpt_megatron.eval.standalone import benchmark_checkpoint, evaluate_checkpoint

    res = {"results": {}, "ckpt": args.ckpt, "rank": None}
    if args.data:
        from cpt_megatron.train.engine import Engine, OptimConfig

        def make_eval_fn(chunks, parallel, *, seq_len, micro_batch):
            return Engine(chunks, parallel, OptimConfig(), seq_len=seq_len, micro_batch=micro_batch).eval_step

        res = evaluate_checkpoint(args.ckpt, args.data, make_eval_fn=make_eval_fn, tp=args.tp, pp=args.pp, **common)
    if tasks:
        bench = benchmark_checkpoint(args.ckpt, tasks, tp=args.tp, pp=args.pp, tokenizer=args.tokenizer,
                                     micro_batch=args.micro_batch, **_bench_kw(args))
        res.update(benchmarks=bench["summary"], rank=bench["rank"], tp=args.tp, pp=args.pp)
        if args.output and bench["rank"] == 0:
            _write_output(args.output, bench["lm_eval"])
            res["output"] = args.output
    if res["rank"] != 0:
        return None
    _print(res)
    return res
