"""`cpt mixture report`: realized token shares, epochs and phases of a mixture, before training.
`cpt mixture search`: the domain share alpha for a forgetting budget, from proxy runs and a fitted mixing law."""

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
    s = sub.add_parser(
        "search", parents=[subparsers.common],
        help="short proxy runs at several alpha, a mixing law fitted per held-out set, the largest alpha whose "
             "predicted general regression stays within the monitor's act threshold (PNG + YAML snippet)")
    s.add_argument("--recipe", required=True, help="recipe name under recipes/ or a YAML path")
    s.add_argument("overrides", nargs="*", help="recipe overrides for every proxy, e.g. optim.lr=1e-4")
    s.add_argument("--alphas", type=_alphas, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="comma-separated domain shares of the proxies (default 0,0.25,0.5,0.75,1; 3 at least)")
    s.add_argument("--proxy-steps", type=positive_int, default=None,
                   help="steps per proxy (default min(recipe steps, 100)); evaluated half way and at the end")
    s.add_argument("--proxy-model", default=None, metavar="PATH",
                   help="a smaller model of the same family/tokenizer (.gguf, HF folder, cpt checkpoint, config.json)")
    s.add_argument("--out", default=None, metavar="DIR", help="search folder (default RUN_DIR-mixture-search)")
    s.add_argument("--jobs", type=positive_int, default=1, help="proxies trained at the same time (default 1)")
    s.add_argument("--nproc", type=positive_int, default=None, help="processes per proxy (cpt train --nproc)")
    s.add_argument("--proxy-index", type=nonneg_int, default=None, metavar="I",
                   help="train only proxy I of --alphas and stop (a Slurm array task; slurm/mixture_search.sh)")
    s.add_argument("--no-prepare", action="store_true", help="skip `cpt prepare` (a previous job prepared)")
    s.add_argument("--keep-checkpoints", action="store_true", help="keep each proxy's final checkpoint")
    s.set_defaults(func=run_search)
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


def _alphas(text: str) -> list[float]:
    import argparse

    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None


def run_search(args) -> dict:
    from cpt_megatron.train.mixture_search import SearchConfig, search

    res = search(SearchConfig(recipe=args.recipe, overrides=args.overrides, alphas=args.alphas,
                              proxy_steps=args.proxy_steps, proxy_model=args.proxy_model, out=args.out,
                              jobs=args.jobs, nproc=args.nproc, proxy_index=args.proxy_index,
                              prepare=not args.no_prepare, keep_checkpoints=args.keep_checkpoints))
    if args.proxy_index is not None:
        if not args.json:
            for p in res["proxies"]:
                print(f"proxy alpha={p['alpha']:g}: {'reused' if p['reused'] else 'trained'} ({p['dir']})")
        return res
    if args.json:
        pred = res["predicted"] or {}
        return {"alpha": res["alpha"], "feasible": res["feasible"], "alpha_conservative": res["alpha_conservative"],
                "predicted_general_regression": pred.get("general_regression"),
                "predicted_domain_gain": pred.get("domain_gain"), "budget": res["budget"],
                "extrapolation": {k: res["extrapolation"][k] for k in ("proxy_tokens", "full_tokens", "factor_tokens")},
                "proxies": res["proxies"], "json": res["json"], "png": res["png"], "yaml": res["yaml"]}
    for p in res["proxies"]:
        print(f"proxy alpha={p['alpha']:g}: {'reused' if p['reused'] else 'trained'} ({p['dir']})")
    for n, st in res["sets"].items():
        law = st["law"]
        print(f"{st['group']:<8} {n}: L(alpha) = {law['c']:.4f} + {law['k']:.4g}*exp({law['t']:.3f}*alpha) "
              f"(base {st['base_loss']:.4f}, rss {law['rss']:.2e}, token exponent {st['token_exponent']})")
    ex = res["extrapolation"]
    print(f"extrapolation: {ex['proxy_tokens']:,} proxy tokens -> {ex['full_tokens']:,} ({ex['factor_tokens']:.3g}x); "
          f"{ex['method']}")
    for note in res["notes"]:
        print(f"NOTE: {note}")
    if res["alpha"] is None:
        lr = res["least_regressing"]
        print(f"no alpha keeps the predicted general regression within {res['budget']['act']:.1%}: the least is "
              f"{lr['general_regression']:+.2%} at alpha {lr['alpha']:g}")
    else:
        p = res["predicted"]
        band = f" (+1 sigma: {p['general_regression_1sigma']:+.2%}, alpha {res['alpha_conservative']})" \
            if "general_regression_1sigma" in p else " (no error band: give 4+ alphas)"
        print(f"recommended alpha {res['alpha']:g}: predicted general regression {p['general_regression']:+.2%}{band} "
              f"within {res['budget']['act']:.1%}; domain ppl gain {p['domain_gain']:+.2%}")
    print(f"wrote {res['json']}, {res['png']}, {res['yaml']}:\n{res['snippet']}", end="")
    return res


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
