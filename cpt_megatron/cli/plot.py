"""`cpt plot`: loss/lr curves and domain/general eval curves with thresholds and events (RUN/plots/*.png)."""

from __future__ import annotations

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", parents=[subparsers.common],
                              help="plot a run: loss/lr, domain and general eval curves with monitor events")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory")
    p.add_argument("--metric", default="ppl", choices=("ppl", "loss", "bits_per_byte", "bits_per_char"),
                   help="eval metric of the domain/general curves (default ppl)")
    p.set_defaults(func=run)


def run(args) -> dict:
    from cpt_megatron.eval.plot import plot_run

    res = plot_run(args.run, metric=args.metric)
    for path in res["plots"]:
        print(path, flush=True)
    return res
