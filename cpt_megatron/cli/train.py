"""`cpt prepare --recipe R`, `cpt train --recipe R [key=value ...]` and `cpt schedule --recipe R --png out.png`."""

from __future__ import annotations

import json

from cpt_megatron.cli._types import positive_int


def register(subparsers):
    q = subparsers.add_parser("prepare", parents=[subparsers.common],
                              help="prepare a recipe's base model and data (import, curate, tokenize, mixture "
                                   "index); single process, resumable, no GPU; run it before `cpt train`")
    q.add_argument("--recipe", required=True, help="recipe name under recipes/ or a YAML path")
    q.add_argument("overrides", nargs="*", help="the same hydra-style overrides `cpt train` gets")
    q.add_argument("-j", "--workers", type=positive_int, default=1, help="curation/tokenization worker processes")
    q.set_defaults(func=run_prepare)
    p = subparsers.add_parser("train", parents=[subparsers.common],
                              help="continued pretraining from a recipe (torchrun/srun, or --nproc N); "
                                   "run `cpt prepare` with the same arguments first")
    p.add_argument("--recipe", required=True, help="recipe name under recipes/ or a YAML path")
    p.add_argument("overrides", nargs="*",
                   help="hydra-style overrides, anywhere on the line, e.g. train.max_steps=8 parallel.tp=2")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="local processes to spawn with torchrun (default parallel.tp*pp when not under a launcher)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe as training would (layout, memory estimate, data, prepared data); "
                        "writes nothing")
    p.set_defaults(func=run)
    s = subparsers.add_parser("schedule", parents=[subparsers.common], help="draw a recipe's LR schedule")
    s.add_argument("--recipe", required=True, help="recipe name under recipes/ or a YAML path")
    s.add_argument("overrides", nargs="*", help="recipe overrides, e.g. schedule.warmup=10")
    s.add_argument("--png", default=None, help="write the LR curve here")
    s.set_defaults(func=run_schedule)


def run_prepare(args):
    from cpt_megatron.config import load_recipe
    from cpt_megatron.errors import CptError
    from cpt_megatron.train.prepare import prepare

    if args.workers < 1:
        raise CptError(f"--workers {args.workers}: must be >= 1")
    res = prepare(load_recipe(args.recipe, args.overrides), workers=args.workers)
    if not args.json:
        print(f"prepared: base {res['base']}; " + ", ".join(f"{s['name']} -> {s['prefix']}" for s in res["sources"])
              + f"; manifest {res['manifest']}")
    return res


def run(args):
    if args.dry_run:
        return _run(args)
    from cpt_megatron.runtime.launch import startup_preemption_exit

    with startup_preemption_exit("cpt train"):  # until the trainer's own handler: SIGTERM -> one line, exit 75
        return _run(args)


def _run(args):
    from cpt_megatron.config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from cpt_megatron.errors import CptError
        from cpt_megatron.train.dryrun import dry_run, failure_line, format_dry_run

        res = dry_run(cfg, nproc=args.nproc, recipe=args.recipe, overrides=args.overrides, strict=False)
        if not args.json:
            print(format_dry_run(res), flush=True)
        elif not res["ok"]:
            print(json.dumps(res), flush=True)  # the report, then the one-line error
        if not res["ok"]:
            raise CptError(failure_line(res))
        return res
    from cpt_megatron.runtime.launch import relaunched

    if relaunched(args.nproc, default=cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp):
        return None  # rank 0 of the children printed the results
    from cpt_megatron.runtime import dist_env
    from cpt_megatron.train.driver import train

    res = train(cfg, args.overrides, recipe=args.recipe)
    if dist_env().rank == 0 and args.json:
        print(json.dumps({"losses": res.losses, "first_step": res.first_step, "last_step": res.last_step,
                          "run_dir": res.run_dir, "stopped": res.stopped}), flush=True)
    if res.exit_code:
        raise SystemExit(res.exit_code)
    return None


def run_schedule(args):
    from cpt_megatron.config import load_recipe
    from cpt_megatron.train.plan import plan_steps
    from cpt_megatron.train.schedule import lr_at

    cfg = load_recipe(args.recipe, args.overrides)
    n = plan_steps(cfg)
    lrs = [lr_at(s, cfg.schedule, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, total_steps=n) for s in range(n)]
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(range(1, n + 1), lrs)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{cfg.schedule.type}: warmup {cfg.schedule.warmup}, lr {cfg.optim.lr:g} -> {cfg.optim.min_lr:g}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")
    return {"steps": n, "lr_first": lrs[0], "lr_peak": max(lrs), "lr_last": lrs[-1], "png": args.png}
