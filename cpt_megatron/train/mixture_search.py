"""`cpt mixture search`: choose the domain share alpha from short proxy runs and a fitted mixing law.

1. `cpt prepare` once (alpha is not part of the prepared data's key, so every proxy shares it);
2. one proxy per alpha: `cpt train` of the recipe (or of a smaller proxy model, `--proxy-model`) for
   `proxy_steps` steps at that constant alpha, evaluated at step 0 (the base), half way and at the end on the
   recipe's held-out domain and general sets; each proxy lives in OUT/proxies/alpha_<a>-<key>/, where <key>
   hashes the proxy's resolved recipe, and is reused when its metrics.json exists (resume);
3. per held-out set, the law L(alpha) = c + k exp(t alpha) (eval/mixing_law.py: why this form, the fit and
   its uncertainty), scaled from the proxy's tokens to the full run's by a power law in tokens fitted from the
   two proxy lengths;
4. the recommendation: the largest alpha whose predicted general regression (the monitor's measure, on its
   watched metrics, worst general set) stays within the monitor's `act` threshold, with the predicted domain
   gain (cpt select's measure); OUT/search.json, OUT/search.png and OUT/recommendation.yaml are written only
   when everything before succeeded.

Proxies run as subprocesses of the CLI (`cpt train --json`), as the recipe would run; `jobs` of them at a time.
On Slurm, an array runs one proxy per task (`proxy_index`) and a last job fits (slurm/mixture_search.sh).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cpt_megatron.config import RecipeConfig, load_recipe
from cpt_megatron.errors import CptError

__all__ = ["SearchConfig", "search", "general_heldout_sets", "domain_heldout_sets", "proxy_overrides",
           "analyze", "PROXY_FIXED"]

PROXY_FIXED = ("data.phases=[]", "train.tokens=null", "eval.monitor.policy=warn", "eval.benchmarks=[]",
               "checkpoint.save_interval=null",
               "logging.progress=false", "logging.tensorboard=false", "logging.wandb=false", "resume=auto")
"""Overrides every proxy gets: one constant alpha (no curriculum), a step budget, a monitor that only logs (a
stop/rollback/adapt would change the mixture being measured), no lm-eval benchmarks (the law is fitted on held-out
losses), one final checkpoint (for preemption only)."""
_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


@dataclasses.dataclass(kw_only=True)
class SearchConfig:
    """What `cpt mixture search` was asked for."""

    recipe: str
    overrides: list[str] = dataclasses.field(default_factory=list)
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Domain shares of the proxies (3 distinct at least: the law has 3 parameters; 4+ give an error band)."""
    proxy_steps: int | None = None
    """Steps per proxy (None = min(the recipe's steps, 100)); evaluated at step 0, proxy_steps // 2 and the end."""
    proxy_model: str | None = None
    """A smaller model of the same family and tokenizer: a .gguf file, an HF folder, a `cpt import-hf` checkpoint
    or an HF config.json (random init); None = the recipe's base."""
    out: str | None = None
    """Search folder (None = RUN_DIR-mixture-search)."""
    jobs: int = 1
    """Proxies trained at the same time (local processes)."""
    nproc: int | None = None
    """Processes per proxy (cpt train --nproc)."""
    proxy_index: int | None = None
    """Train only proxy number I of `alphas` and stop (a Slurm array task); None = all, then fit."""
    keep_checkpoints: bool = False
    """Keep each proxy's final checkpoint (default: removed once its metrics are saved)."""
    prepare: bool = True
    """Run `cpt prepare` first (resumable; off when a previous job prepared)."""

    def __post_init__(self):
        bad = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise CptError(f"--alphas: {bad[0]} is not a domain share in [0, 1]")
        if self.proxy_steps is not None and self.proxy_steps < 2:
            raise CptError(f"--proxy-steps {self.proxy_steps}: need >= 2 (the law is read at two proxy lengths)")
        if self.jobs < 1:
            raise CptError(f"--jobs {self.jobs}: must be >= 1")
        if self.proxy_index is not None and not 0 <= self.proxy_index < len(self.alphas):
            raise CptError(f"--proxy-index {self.proxy_index}: --alphas has {len(self.alphas)} values "
                           f"(index 0..{len(self.alphas) - 1})")


# -- which held-out sets ------------------------------------------------------------------------------------
def general_heldout_sets(cfg: RecipeConfig) -> list[str]:
    """Names of the general held-out sets the search (and the monitor) measures forgetting on: `eval.general`,
    text that no training source contains (the replay corpus's own validation tail is logged as `replay` and
    is not a measure of forgetting: the run trains on that distribution)."""
    return [g.name for g in cfg.eval.general]


def domain_heldout_sets(cfg: RecipeConfig) -> list[str]:
    """Names of the held-out domain sets (the domain sources' validation tails)."""
    return [s.name for s in cfg.data.sources if s.group == "domain"] if cfg.data.valid_fraction > 0 else []


def _check_recipe(cfg: RecipeConfig, sc: SearchConfig) -> None:
    where = f"recipe {sc.recipe}"
    if not general_heldout_sets(cfg):
        raise CptError(f"{where}: no general held-out set: the search measures forgetting on eval.general (text no "
                       "training source contains); add eval.general: [{name: NAME, path: FILE}] to the recipe")
    if not domain_heldout_sets(cfg):
        raise CptError(f"{where}: no domain held-out set: add a data.sources entry with group: domain")
    from cpt_megatron.eval.mixing_law import MIN_POINTS

    n = len(set(sc.alphas))
    if n < MIN_POINTS:
        raise CptError(f"--alphas {','.join(f'{a:g}' for a in sc.alphas)}: {n} distinct value(s); the law "
                       f"c + k*exp(t*alpha) has 3 parameters: give at least {MIN_POINTS} (5 for an error band)")


# -- proxies ------------------------------------------------------------------------------------------------
def _model_overrides(proxy_model: str | None) -> list[str]:
    if not proxy_model:
        return []
    p = Path(proxy_model)
    if not p.exists():
        raise CptError(f"--proxy-model {proxy_model}: not found (give a .gguf file, an HF folder, a `cpt import-hf` "
                       "checkpoint folder or an HF config.json)")
    if p.suffix == ".gguf":
        kind = "gguf"
    elif p.is_file() and p.suffix == ".json":
        kind = "hf_config"
    elif (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        kind = "hf"
    else:
        kind = "base"
    return [f"model.{k}={str(p.resolve()) if k == kind else 'null'}" for k in ("base", "hf", "gguf", "hf_config")]


def proxy_overrides(sc: SearchConfig, alpha: float, steps: int) -> list[str]:
    """The overrides of one proxy, without its run.dir (they identify it)."""
    return [*sc.overrides, *_model_overrides(sc.proxy_model), f"data.alpha={alpha:g}", f"train.max_steps={steps}",
            f"eval.interval={max(1, steps // 2)}", *PROXY_FIXED]


def _proxy_key(sc: SearchConfig, overrides: list[str]) -> str:
    """Hash of the proxy's resolved recipe (run.dir aside): the same training gives the same key."""
    tree = dataclasses.asdict(load_recipe(sc.recipe, overrides))
    tree["run"].pop("dir", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclasses.dataclass(kw_only=True)
class _Proxy:
    alpha: float
    overrides: list[str]
    key: str
    dir: Path

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.json"


def _plan_proxies(sc: SearchConfig, out: Path, steps: int) -> list[_Proxy]:
    proxies = []
    for a in sc.alphas:
        ov = proxy_overrides(sc, a, steps)
        key = _proxy_key(sc, ov)
        proxies.append(_Proxy(alpha=float(a), overrides=ov, key=key, dir=out / "proxies" / f"alpha_{a:.3f}-{key}"))
    return proxies


def _cpt(*argv: str) -> list[str]:
    return [sys.executable, "-m", "cpt_megatron", *argv]


def _run_prepare(sc: SearchConfig, out: Path) -> None:
    ov = [*sc.overrides, *_model_overrides(sc.proxy_model)]
    log = out / "prepare.log"
    with open(log, "w") as f:
        rc = subprocess.call(_cpt("prepare", "--recipe", sc.recipe, *ov), stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise CptError(f"cpt prepare --recipe {sc.recipe} failed (exit {rc}): {_last_line(log)} (log: {log})")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def _read_evals(run_dir: Path) -> dict[int, dict]:
    from cpt_megatron.utils import read_jsonl

    evals = {}
    for rec in read_jsonl(run_dir / "evals.jsonl", "proxy evals.jsonl"):
        evals[int(rec["step"])] = {n: {k: r[k] for k in ("loss", "ppl", "tokens", "group") if k in r}
                                   for n, r in rec["results"].items() if not r.get("benchmark")}
    return evals


def _train_proxy(sc: SearchConfig, p: _Proxy, steps: int, tokens_per_step: int) -> dict:
    """Train one proxy (or reuse it) and return its metrics; CptError when it fails or diverges."""
    from cpt_megatron.runtime.procs import popen_kwargs
    from cpt_megatron.utils import read_json, write_json

    if p.metrics_path.is_file():
        return read_json(p.metrics_path, "proxy metrics")
    p.dir.mkdir(parents=True, exist_ok=True)
    run_dir = p.dir / "run"
    cmd = _cpt("train", "--recipe", sc.recipe, *p.overrides, f"run.dir={run_dir}", "--json")
    if sc.nproc:
        cmd += ["--nproc", str(sc.nproc)]
    log = p.dir / "train.log"
    with open(log, "w") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, **popen_kwargs())
        stdout, _ = proc.communicate()
        f.write(stdout)
    what = f"proxy alpha={p.alpha:g} ({p.dir})"
    if proc.returncode:
        raise CptError(f"{what}: cpt train failed (exit {proc.returncode}): {_last_line(log)}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    evals = _read_evals(run_dir)
    bad = [(s, n) for s, res in evals.items() for n, r in res.items() if not math.isfinite(r.get("loss", math.nan))]
    if result.get("stopped") or bad:
        reason = result.get("stopped") or f"non-finite held-out loss of {bad[0][1]} at step {bad[0][0]}"
        raise CptError(f"{what} diverged: {reason}; lower optim.lr or --proxy-steps, or drop this alpha")
    if 0 not in evals or steps not in evals:
        raise CptError(f"{what}: evals.jsonl lacks the step-0 baseline or the final step {steps}: {_last_line(log)}")
    metrics = {"alpha": p.alpha, "key": p.key, "overrides": p.overrides, "steps": steps,
               "tokens_per_step": tokens_per_step, "evals": {str(s): r for s, r in sorted(evals.items())},
               "final_train_loss": (result.get("losses") or [None])[-1]}
    write_json(p.metrics_path, metrics)
    if not sc.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return metrics


def _run_proxies(sc: SearchConfig, proxies: list[_Proxy], steps: int, tokens_per_step: int) -> list[dict]:
    if sc.jobs == 1:
        return [_train_proxy(sc, p, steps, tokens_per_step) for p in proxies]
    with ThreadPoolExecutor(max_workers=sc.jobs) as pool:
        futures = [pool.submit(_train_proxy, sc, p, steps, tokens_per_step) for p in proxies]
    return [f.result() for f in futures]  # the first failure (in alpha order) is raised; finished ones are kept


# -- the fit and the recommendation -------------------------------------------------------------------------
def _watched_metrics(cfg: RecipeConfig) -> tuple[list[str], float, list[str]]:
    from cpt_megatron.eval.monitor import LOWER_IS_BETTER, MonitorConfig

    mon = MonitorConfig(**cfg.eval.monitor)
    watched = [m for m in mon.metrics if m in LOWER_IS_BETTER]
    notes = []
    if not watched:
        notes.append(f"eval.monitor.metrics={mon.metrics} has no loss-based metric; the budget is applied to ppl")
        watched = ["ppl"]
    return watched, float(mon.act), notes


def analyze(metrics: list[dict], *, general: list[str], domain: list[str], watched: list[str], budget: float,
            full_tokens: int) -> dict:
    """Fit the law per held-out set on the proxies' final losses, scale it to `full_tokens`, recommend alpha.
    Pure (no I/O): `metrics` are the proxies' metrics.json contents."""
    from cpt_megatron.eval.mixing_law import fit_exp_law, recommend, relative_change, token_exponent

    steps = metrics[0]["steps"]
    mid, tps = max(1, steps // 2), metrics[0]["tokens_per_step"]
    d_mid, d_end = mid * tps, steps * tps
    alphas = np.array([m["alpha"] for m in metrics])
    base = {n: float(np.mean([m["evals"]["0"][n]["loss"] for m in metrics])) for n in general + domain}
    laws, sets = {}, {}
    for group, names in (("general", general), ("domain", domain)):
        pairs = []
        for n in names:
            end = np.array([m["evals"][str(steps)][n]["loss"] for m in metrics])
            at_mid = np.array([m["evals"][str(mid)][n]["loss"] for m in metrics]) if steps > mid else end
            laws[n] = fit_exp_law(alphas, end, what=f"held-out set {n!r}")
            pairs += list(zip(at_mid - base[n], end - base[n]))
            sets[n] = {"group": group, "base_loss": base[n], "alphas": alphas.tolist(), "loss": end.tolist(),
                       "loss_mid": at_mid.tolist()}
        b = token_exponent(pairs, d_end / d_mid)
        factor = (full_tokens / d_end) ** b if b is not None else 1.0
        for n in names:
            sets[n].update(token_exponent=b, token_factor=factor, law=laws[n].to_dict())
    grid = _GRID

    def exponent_of(names):
        return next((sets[n]["token_exponent"] for n in names), None)

    def predicted_loss(n, a):  # the law scaled to the full run's tokens
        return base[n] + sets[n]["token_factor"] * (laws[n](a) - base[n])

    def regression(a, sigma=0.0):
        worst = np.full(np.shape(a), -np.inf)
        for n in general:
            loss = predicted_loss(n, a)
            std = laws[n].std(a)
            if sigma and std is not None:
                loss = loss + sigma * sets[n]["token_factor"] * std
            for m in watched:
                worst = np.maximum(worst, relative_change(m, loss, base[n]))
        return worst

    def gain(a):  # cpt select's domain gain: mean relative ppl improvement
        return np.mean([-relative_change("ppl", predicted_loss(n, a), base[n]) for n in domain], axis=0)

    notes = [f"{g}: no token exponent (the changes at the half-way evaluation are below 1e-4 nats or change sign): "
             "its law is used at the proxy's tokens, not extrapolated; raise --proxy-steps"
             for g, names in (("general", general), ("domain", domain))
             if exponent_of(names) is None and full_tokens != d_end]
    notes += [f"held-out set {n!r}: the law is not identified (t at its bound; losses {np.round(sets[n]['loss'], 4).tolist()} "
              f"at alphas {alphas.tolist()} are not monotone or jump): the differences between proxies may be run-to-run "
              "noise; give more eval.batches, longer proxies or more alphas" for n in general + domain if not laws[n].identified]
    reg_grid = regression(grid)
    alpha = recommend(grid, reg_grid, budget)
    has_band = all(laws[n].cov is not None and laws[n].identified for n in general)
    alpha_cons = recommend(grid, regression(grid, sigma=1.0), budget) if has_band else None
    out = {"alpha": alpha, "feasible": alpha is not None, "budget": {"act": budget, "metrics": watched},
           "alpha_conservative": alpha_cons, "notes": notes,
           "predicted": None, "sets": sets,
           "extrapolation": {"method": "dL(D) = dL(D_proxy) * (D / D_proxy)^b per group, b from the evaluations "
                                       f"at {d_mid:,} and {d_end:,} proxy tokens",
                             "proxy_tokens": d_end, "full_tokens": int(full_tokens),
                             "factor_tokens": full_tokens / d_end,
                             "exponents": {g: exponent_of(names)
                                           for g, names in (("general", general), ("domain", domain))}},
           "curve": {"alpha": grid.tolist(), "general_regression": reg_grid.tolist(), "domain_gain": gain(grid).tolist()}}
    if alpha is not None:
        pred = {"general_regression": float(regression(alpha)), "domain_gain": float(gain(alpha)),
                "loss": {n: float(predicted_loss(n, alpha)) for n in general + domain}}
        if has_band:
            pred["general_regression_1sigma"] = float(regression(alpha, sigma=1.0))
        out["predicted"] = pred
    else:
        i = int(np.argmin(reg_grid))
        out["least_regressing"] = {"alpha": float(grid[i]), "general_regression": float(reg_grid[i])}
    return out


def _snippet(res: dict, sc: SearchConfig) -> str:
    ex = res["extrapolation"]
    if res["alpha"] is None:
        lr = res["least_regressing"]
        return (f"# cpt mixture search: no alpha keeps the predicted general regression within {res['budget']['act']:.1%}"
                f" (least: alpha {lr['alpha']:g} -> {lr['general_regression']:+.2%}); lower the lr or raise eval.monitor.act\n")
    p = res["predicted"]
    scaled = (f"extrapolated x{ex['factor_tokens']:.3g} to {ex['full_tokens']:,}"
              if ex["exponents"]["general"] is not None and ex["factor_tokens"] != 1
              else f"not extrapolated to the full run's {ex['full_tokens']:,}")
    return ("data:\n"
            f"  alpha: {res['alpha']:g}   # cpt mixture search --recipe {sc.recipe}: predicted general "
            f"{'/'.join(res['budget']['metrics'])} {p['general_regression']:+.2%} (budget {res['budget']['act']:.1%}), "
            f"domain ppl gain {p['domain_gain']:+.2%}; law fitted on alphas "
            f"{','.join(f'{a:g}' for a in sorted(sc.alphas))} at {ex['proxy_tokens']:,} tokens, {scaled}\n")


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpt_megatron.eval.mixing_law import ExpLaw, relative_change

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = np.array(res["curve"]["alpha"])
    for ax, group in zip(axes, ("domain", "general")):
        for n, s in res["sets"].items():
            if s["group"] != group:
                continue
            law, b0 = ExpLaw(**s["law"]), s["base_loss"]
            pts = ax.scatter(s["alphas"], 100 * relative_change("ppl", np.array(s["loss"]), b0), zorder=3,
                             label=f"{n}: proxies ({res['extrapolation']['proxy_tokens']:,} tokens)")
            ax.plot(grid, 100 * relative_change("ppl", law(grid), b0), color=pts.get_facecolor()[0], label=f"{n}: law")
            std = law.std(grid) if law.identified else None  # a step fit's covariance is meaningless
            if std is not None:
                ax.fill_between(grid, 100 * relative_change("ppl", law(grid) - std, b0),
                                100 * relative_change("ppl", law(grid) + std, b0), alpha=0.15,
                                color=pts.get_facecolor()[0])
            if s["token_factor"] != 1.0:
                ax.plot(grid, 100 * relative_change("ppl", b0 + s["token_factor"] * (law(grid) - b0), b0), "--",
                        color=pts.get_facecolor()[0],
                        label=f"{n}: at {res['extrapolation']['full_tokens']:,} tokens (x{s['token_factor']:.3g})")
        ax.set_title(f"{group} held-out ppl vs base")
        ax.set_xlabel("alpha (domain share of training tokens)")
        ax.set_ylabel("ppl change (%)")
        ax.grid(alpha=0.3)
    axes[1].axhline(100 * res["budget"]["act"], color="red", lw=1, label=f"budget (monitor act {res['budget']['act']:.1%})")
    if res["alpha"] is not None:
        for ax in axes:
            ax.axvline(res["alpha"], color="black", ls=":", label=f"recommended alpha {res['alpha']:g}")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    from cpt_megatron.utils import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# -- the command --------------------------------------------------------------------------------------------
def search(sc: SearchConfig) -> dict:
    """Run (or reuse) the proxies, fit, recommend; returns the result (also OUT/search.json)."""
    from cpt_megatron.train.plan import plan_steps
    from cpt_megatron.utils import atomic_file, write_json

    cfg = load_recipe(sc.recipe, sc.overrides)
    _check_recipe(cfg, sc)
    full_steps = plan_steps(cfg)
    steps = sc.proxy_steps or min(full_steps, 100)
    steps = max(steps, 2)
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    out = Path(sc.out or f"{cfg.run.dir.rstrip('/')}-mixture-search")
    proxies = _plan_proxies(sc, out, steps)
    out.mkdir(parents=True, exist_ok=True)
    if sc.proxy_index is not None:
        proxies = [proxies[sc.proxy_index]]
    if sc.prepare and not all(p.metrics_path.is_file() for p in proxies):
        _run_prepare(sc, out)
    reused = [p.metrics_path.is_file() for p in proxies]
    metrics = _run_proxies(sc, proxies, steps, tokens_per_step)
    summary = [{"alpha": p.alpha, "dir": str(p.dir), "reused": r} for p, r in zip(proxies, reused)]
    if sc.proxy_index is not None:
        return {"proxies": summary}
    watched, budget, notes = _watched_metrics(cfg)
    res = analyze(metrics, general=general_heldout_sets(cfg), domain=domain_heldout_sets(cfg), watched=watched,
                  budget=budget, full_tokens=full_steps * tokens_per_step)
    res["notes"] = res["notes"] + notes + (["recipe has data.phases: proxies and the recommendation use one constant alpha"]
                            if cfg.data.phases else [])
    res |= {"recipe": sc.recipe, "overrides": sc.overrides, "proxy_steps": steps, "proxy_model": sc.proxy_model,
            "proxies": summary, "png": str(out / "search.png"), "yaml": str(out / "recommendation.yaml"),
            "json": str(out / "search.json")}
    res["snippet"] = _snippet(res, sc)
    _plot(res, out / "search.png")
    with atomic_file(out / "recommendation.yaml") as f:
        f.write(res["snippet"])
    write_json(out / "search.json", res)
    return res
