"""`cpt select`: rank a run's checkpoints (domain gain under a general-regression limit), write RUN/best; with
--merge-grid, merge the run's checkpoint with its base at each λ and pick on the same trade-off (RUN/best_merge)."""

from __future__ import annotations

from cpt_megatron.cli._types import nonneg_float, positive_int

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("select", parents=[subparsers.common],
                              help="rank saved checkpoints by domain gain vs general regression; write RUN/best")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (evals.jsonl, checkpoints/)")
    p.add_argument("--max-general-regression", type=nonneg_float, default=None,
                   help="worst allowed relative regression of any general source (0.03 = 3%%; default: the run's "
                        "eval.monitor.act, 0.03 unless its recipe set it)")
    p.add_argument("--weights", default=None, metavar="domain=W,general=W",
                   help="rank by W_d x domain gain - W_g x general regression instead of domain gain")
    p.add_argument("--metric", default="ppl", choices=("ppl", "loss", "bits_per_byte", "bits_per_char"),
                   help="eval metric the gains and regressions are measured in (default ppl)")
    m = p.add_argument_group("merge grid (base <-> CPT interpolation, `cpt merge`)")
    m.add_argument("--merge-grid", default=None, metavar="L1,L2",
                   help="λ values in (0, 1), e.g. 0.25,0.5,0.75: merge (1-λ)·base + λ·checkpoint into RUN/merges/, "
                        "evaluate them with λ=0 and λ=1 and pick on the Pareto front under the budget")
    m.add_argument("--base", default=None, metavar="CKPT", help="the run's base checkpoint (required with --merge-grid)")
    m.add_argument("--merge-ckpt", default=None, metavar="CKPT",
                   help="the checkpoint to merge toward (default: the run's latest checkpoint)")
    m.add_argument("--domain-data", nargs="+", default=[], metavar="FILE",
                   help="held-out domain text (.txt/.jsonl) the merges are scored on (source = file stem)")
    m.add_argument("--general-data", nargs="+", default=[], metavar="FILE",
                   help="held-out general text, from corpora no training source contains")
    m.add_argument("--seq-len", type=positive_int, default=512, help="evaluation window in tokens")
    m.add_argument("--micro-batch", type=positive_int, default=4, help="windows per forward pass")
    m.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens of each file")
    p.set_defaults(func=run)


def run(args) -> dict:
    from cpt_megatron.errors import CptError
    from cpt_megatron.eval.select import parse_weights, run_budget, select_checkpoint

    weights = parse_weights(args.weights)
    limit = run_budget(args.run) if args.max_general_regression is None else args.max_general_regression
    if args.merge_grid is not None:
        return _merge_grid(args, weights, limit)
    res = select_checkpoint(args.run, max_general_regression=limit, weights=weights, metric=args.metric)
    print(res.pop("report"), end="", flush=True)
    if res["best"] is None:  # RUN/best and the report on disk stay as the last successful selection left them
        worst = min(res["candidates"], key=lambda c: c["general_regression"])
        raise CptError(f"no checkpoint keeps the general regression <= {limit:.1%} (least: "
                       f"{worst['iter']} at {worst['general_regression']:+.2%}); raise --max-general-regression or "
                       "retrain with more replay (lower data.alpha)")
    return res


def _merge_grid(args, weights, limit: float) -> dict:
    from pathlib import Path

    from cpt_megatron.errors import CptError
    from cpt_megatron.eval.select import parse_grid, select_merge

    grid = parse_grid(args.merge_grid)
    if not args.base:
        raise CptError("--merge-grid needs --base CKPT (the base model the run started from)")
    if not args.domain_data or not args.general_data:
        raise CptError("--merge-grid needs --domain-data FILE... and --general-data FILE... (held-out text the "
                       "base, the merges and the checkpoint are scored on)")
    for f in args.domain_data + args.general_data:
        if not Path(f).is_file():
            raise CptError(f"{f}: file not found (give .txt or .jsonl held-out text)")
    from cpt_megatron.eval.standalone import evaluate_checkpoint
    from cpt_megatron.train.engine import Engine, OptimConfig

    def make_eval_fn(chunks, parallel, *, seq_len, micro_batch):
        return Engine(chunks, parallel, OptimConfig(), seq_len=seq_len, micro_batch=micro_batch).eval_step

    def evaluate(ckpt) -> dict:
        out = {}
        for group, files in (("domain", args.domain_data), ("general", args.general_data)):
            res = evaluate_checkpoint(ckpt, files, make_eval_fn=make_eval_fn, seq_len=args.seq_len,
                                      micro_batch=args.micro_batch, max_tokens=args.max_tokens, group=group)
            out.update(res["results"])
        return out

    res = select_merge(args.run, base=args.base, grid=grid, evaluate=evaluate, ckpt=args.merge_ckpt,
                       max_general_regression=limit, weights=weights, metric=args.metric)
    print(res.pop("report"), end="", flush=True)
    if res["best"] is None:
        least = min((c for c in res["candidates"] if c["lambda"] > 0), key=lambda c: c["general_regression"])
        raise CptError(f"no merge within the general regression budget {limit:.1%} improves on the base (least "
                       f"regression: λ={least['lambda']:g} at {least['general_regression']:+.2%}, domain gain "
                       f"{least['domain_gain']:+.2%}); try smaller λ values or raise --max-general-regression")
    return res
