"""`cpt mixture report`: realized token shares, epochs and phases of a mixture, before training."""

from __future__ import annotations

import json

from cpt_megatron.cli._types import nonneg_int, positive_int
from cpt_megatron.errors import CptError

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("mixture", help="inspect data mixtures")
    sub = p.add_subparsers(dest="mixture_command", metavar="<subcommand>")
    r = sub.add_parser(
        "report",
        parents=[subparsers.common],
        help="token share per source/group, epochs per source, tokens per phase, PNG of the schedule",
    )
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="a training recipe: its data section, seq_len and planned samples")
    src.add_argument("--mixture", metavar="FILE.yaml", help="YAML of MixtureConfig (sources, alpha, phases...)")
    r.add_argument("overrides", nargs="*", help="recipe overrides (with --recipe), e.g. data.alpha=0.5")
    r.add_argument("--seq-len", type=positive_int, default=None, help="with --mixture (required)")
    r.add_argument("--train-samples", type=positive_int, default=None, help="with --mixture (required)")
    r.add_argument("--valid-samples", type=nonneg_int, default=0, help="validation samples (default 0)")
    r.add_argument("--cache-dir", default=None, help="megatron index cache (default: a temp dir, removed after)")
    r.add_argument("--png", default=None, metavar="OUT.png", help="plot the domain share over the run")
    r.add_argument("--megatron", action="store_true",
                   help="also print Megatron-LM's --data-path/--split per phase (and what does not carry over)")
    r.set_defaults(func=run_report)
    p.set_defaults(func=lambda args: p.print_help())


def run_report(args) -> dict:
    import shutil
    import tempfile

    from cpt_megatron.data.mixture import build_mixture, mixture_config_from_dict
    from cpt_megatron.data.preprocess import read_meta
    from cpt_megatron.utils import read_yaml

    if args.recipe:
        from cpt_megatron.config import load_recipe
        from cpt_megatron.train.plan import recipe_mixture
        from cpt_megatron.train.prepare import load_prepared, prepare_command

        cfg = load_recipe(args.recipe, args.overrides)
        prepared = load_prepared(cfg, prepare_command(args.recipe, args.overrides))
        mix = recipe_mixture(cfg, prepared, valid_samples=args.valid_samples or 8)
        return _show(mix.report() | ({"png": mix.plot(args.png)} if args.png else {})
                     | ({"megatron": mix.megatron_lm()} if args.megatron else {}), args)
    if args.seq_len is None or args.train_samples is None:
        raise CptError("--mixture needs --seq-len and --train-samples (or use --recipe R)")
    raw = read_yaml(args.mixture, "--mixture", hint="give a mixture YAML (see docs/mixtures.md, recipes/mixtures/)")
    if not isinstance(raw, dict):
        raise CptError(f"--mixture {args.mixture}: expected a mapping with sources/alpha/phases, got "
                       f"{type(raw).__name__}; see docs/mixtures.md")
    try:
        cfg = mixture_config_from_dict(raw.get("mixture", raw))
    except (TypeError, ValueError) as e:
        raise CptError(f"--mixture {args.mixture}: {e}; see docs/mixtures.md") from None
    from cpt_megatron.data.indexed import dataset_exists

    for s in cfg.sources:
        if not dataset_exists(s.prefix):
            raise CptError(f"--mixture {args.mixture}: source {s.name!r}: dataset {s.prefix}.bin/.idx not found; "
                           f"run `cpt preprocess --out {s.prefix} ...` first or fix its prefix")
    meta = read_meta(cfg.sources[0].prefix)
    if not meta or "tokenizer" not in meta:
        raise CptError(f"{cfg.sources[0].prefix}.meta.json missing: the report reads the tokenizer from it; "
                       "re-run `cpt preprocess` for this dataset (it writes the .meta.json)")
    tok = meta["tokenizer"]
    cache = args.cache_dir or tempfile.mkdtemp(prefix="cpt-mixture-")
    try:
        mix = build_mixture(
            cfg, seq_len=args.seq_len, train_samples=args.train_samples, valid_samples=args.valid_samples,
            cache_dir=cache, tokenizer_vocab_size=tok["vocab_size"], eod_id=tok["eod_id"],
            tokenizer_sha256=tok.get("sha256"),
        )
        report = mix.report()
        if args.megatron:
            report["megatron"] = mix.megatron_lm()
        if args.png:
            report["png"] = mix.plot(args.png)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
    return _show(report, args)


def _show(report: dict, args) -> dict:
    if not args.json:
        print(f"{report['tokens']:,} training tokens ({report['train_samples']:,} samples x {report['seq_len']})")
        print("groups: " + ", ".join(f"{g} {s:.3f}" for g, s in report["groups"].items()))
        for name, s in report["sources"].items():
            print(f"  {name:<20} {s['group']:<8} share {s['share']:.3f}  tokens {s['tokens']:>14,}  epochs {s['epochs']:.2f}")
        for k, ph in enumerate(report["phases"]):
            print(f"phase {k}: samples [{ph['start']}, {ph['end']}) alpha {ph['alpha']} realized {ph['domain_share']:.3f} "
                  f"tokens {ph['tokens']:,}")
        for w in report["warnings"]:
            print(f"WARNING: {w}")
        if args.png:
            print(f"wrote {report['png']}")
        if "megatron" in report:
            print("Megatron-LM (pretrain_gpt.py) equivalent:")
            for ph in report["megatron"]["phases"]:
                print(f"  phase {ph['phase']} (samples [{ph['start_sample']}, {ph['end_sample']})): {ph['args']}")
            for c in report["megatron"]["caveats"]:
                print(f"  caveat: {c}")
    return json.loads(json.dumps(report))
