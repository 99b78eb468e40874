"""`cpt select`: rank a run's checkpoints (domain gain under a general-regression limit), write RUN/best."""

from __future__ import annotations

from cpt_megatron.cli._types import nonneg_float

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("select", parents=[subparsers.common],
                              help="rank saved checkpoints by domain gain vs general regression; write RUN/best")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (evals.jsonl, checkpoints/)")
    p.add_argument("--max-general-regression", type=nonneg_float, default=0.03,
                   help="worst allowed relative regression of any general source (0.03 = 3%%)")
    p.add_argument("--weights", default=None, metavar="domain=W,general=W",
                   help="rank by W_d x domain gain - W_g x general regression instead of domain gain")
    p.add_argument("--metric", default="ppl", choices=("ppl", "loss", "bits_per_byte", "bits_per_char"),
                   help="eval metric the gains and regressions are measured in (default ppl)")
    p.set_defaults(func=run)


def run(args) -> dict:
    from cpt_megatron.errors import CptError
    from cpt_megatron.eval.select import parse_weights, select_checkpoint

    res = select_checkpoint(args.run, max_general_regression=args.max_general_regression,
                            weights=parse_weights(args.weights), metric=args.metric)
    print(res.pop("report"), end="", flush=True)
    if res["best"] is None:  # RUN/best and the report on disk stay as the last successful selection left them
        worst = min(res["candidates"], key=lambda c: c["general_regression"])
        raise CptError(f"no checkpoint keeps the general regression <= {args.max_general_regression:.1%} (least: "
                       f"{worst['iter']} at {worst['general_regression']:+.2%}); raise --max-general-regression or "
                       "retrain with more replay (lower data.alpha)")
    return res
