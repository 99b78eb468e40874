"""`cpt select`: rank a run's saved checkpoints by domain gain under a general-regression limit.

Reads the run directory the training driver writes:
    RUN/evals.jsonl          {"step": N, "results": {source: {"group", "ppl", ...}}}; step 0 = base model
    RUN/checkpoints/iter_0000010/ ...   (a candidate = a checkpoint with an evaluation at its step)
For each candidate (metric m, lower is better, default ppl):
    domain_gain        = mean over domain sources of (m0 - m) / m0      (positive = better on the domain)
    general_regression = max over general sources of (m - m0) / m0      (worst case, as the monitor uses)
Feasible: general_regression <= limit. Rank: feasible first, then by score: domain_gain, or with
weights the composite w_domain * domain_gain - w_general * general_regression. The Pareto front
(max gain, min regression) is marked. When a step was evaluated twice (a rollback re-ran it), the
last evaluation wins: it describes the checkpoint now on disk.
Writes RUN/selection.md, RUN/selection.png and last RUN/best (the iter dir name), each atomically, and only
when there is a result: a failed selection (no evaluations, no candidate within the limit, an error while
writing) leaves the previous RUN/best and report untouched, so `cpt export-hf --ckpt $(cat RUN/best)` keeps
working.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from cpt_megatron.errors import CptError
from cpt_megatron.utils import atomic_file, read_jsonl

__all__ = ["select_checkpoint", "load_evals", "list_checkpoints", "score_results", "pareto_front", "parse_weights",
           "select_merge", "parse_grid", "run_budget"]

_ITER = re.compile(r"^iter_(\d+)$")


def load_evals(run_dir: str | Path) -> dict[int, dict]:
    """{step: results}; the last entry per step wins."""
    path = Path(run_dir) / "evals.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a `cpt train` run directory with evaluation enabled?")
    out = {}
    for rec in read_jsonl(path, "evals"):
        out[int(rec["step"])] = rec["results"]
    return out


def list_checkpoints(run_dir: str | Path) -> dict[int, str]:
    """{step: iter dir name} for RUN/checkpoints/iter_*/ directories."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return {}
    return {int(m.group(1)): p.name for p in ck.iterdir() if p.is_dir() and (m := _ITER.match(p.name))}


def parse_weights(spec: str | None) -> dict[str, float] | None:
    """'domain=1,general=2' -> {'domain': 1.0, 'general': 2.0}."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        if not sep or k.strip() not in ("domain", "general"):
            raise CptError(f"--weights {spec!r}: expected domain=W,general=W")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise CptError(f"--weights {spec!r}: {k.strip()}={v.strip()!r} is not a number; "
                             "expected domain=W,general=W, e.g. domain=1,general=2") from None
    return {"domain": out.get("domain", 1.0), "general": out.get("general", 1.0)}


def score_results(results: dict, baseline: dict, metric: str = "ppl") -> tuple[float | None, float | None]:
    """(domain_gain, general_regression) of one evaluation vs. the baseline; None if a group is absent.

    General lm-eval benchmarks (eval.benchmarks) count toward the regression on their watched metric,
    as 0 when the drop is within their standard error (the monitor's rule).
    """
    from cpt_megatron.eval.monitor import benchmark_regression

    gains, regs = [], []
    for src, base in baseline.items():
        if base.get("benchmark"):
            if base.get("group") == "general" and src in results and results[src].get(base["watch"]) is not None:
                reg, _, noise = benchmark_regression(base, results[src])
                regs.append(0.0 if noise else reg)
            continue
        if base.get(metric) is None or src not in results or results[src].get(metric) is None:
            continue
        b, v = float(base[metric]), float(results[src][metric])
        if base.get("group") == "domain":
            gains.append((b - v) / b)
        elif base.get("group") == "general":
            regs.append((v - b) / b)
    return (sum(gains) / len(gains) if gains else None, max(regs) if regs else None)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """points = (gain, regression); True where no other point has >= gain and <= regression, one strictly."""
    front = []
    for i, (g, r) in enumerate(points):
        dominated = any(g2 >= g and r2 <= r and (g2 > g or r2 < r) for j, (g2, r2) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


def select_checkpoint(run_dir: str | Path, *, max_general_regression: float = 0.03,
                      weights: dict[str, float] | None = None, metric: str = "ppl", write: bool = True) -> dict:
    """Rank candidates; returns {"best", "step", "candidates", "metric", ...}; writes best/selection.* when `write`
    and there is a best. "best" is None when no candidate is within the limit (nothing is written then)."""
    run_dir = Path(run_dir)
    evals = load_evals(run_dir)
    if 0 not in evals:
        raise CptError(f"{run_dir}/evals.jsonl has no step-0 (baseline) evaluation; the run must evaluate the base "
                       "model before training (eval at step 0)")
    baseline = evals[0]
    ckpts = list_checkpoints(run_dir)
    cands = []
    for step, name in sorted(ckpts.items()):
        if step not in evals:
            continue
        gain, reg = score_results(evals[step], baseline, metric)
        if gain is None or reg is None:
            raise CptError(f"evaluation at step {step} lacks {metric!r} for the domain or general group; "
                           f"select needs both (sources: {sorted(evals[step])})")
        score = gain if weights is None else weights["domain"] * gain - weights["general"] * reg
        cands.append({"iter": name, "step": step, "domain_gain": gain, "general_regression": reg, "score": score,
                      "feasible": reg <= max_general_regression + 1e-9,  # float slack, as the monitor
                      "benchmarks": {src: r[r["watch"]] for src, r in evals[step].items() if r.get("benchmark")}})
    if not cands:
        raise CptError(f"{run_dir}: no saved checkpoint has an evaluation at its step (checkpoints: "
                       f"{sorted(ckpts.values()) or 'none'}; evaluated steps: {sorted(evals)}); save checkpoints at "
                       "evaluation steps (checkpoint interval a multiple of eval interval)")
    for c, on_front in zip(cands, pareto_front([(c["domain_gain"], c["general_regression"]) for c in cands])):
        c["pareto"] = on_front
    cands.sort(key=lambda c: (not c["feasible"], -c["score"], -c["step"]))
    for rank, c in enumerate(cands, 1):
        c["rank"] = rank
    best = cands[0] if cands[0]["feasible"] else None
    summary = {"best": best["iter"] if best else None, "step": best["step"] if best else None, "metric": metric,
               "max_general_regression": max_general_regression, "weights": weights, "candidates": cands}
    summary["report"] = _markdown(summary)
    if write and best is not None:
        _write(run_dir, summary)
        summary["files"] = [str(run_dir / n) for n in ("best", "selection.md", "selection.png") if (run_dir / n).exists()]
    return summary


def _write(run_dir: Path, summary: dict) -> None:
    """RUN/best last: it only ever names a checkpoint whose report is on disk."""
    with atomic_file(run_dir / "selection.md") as f:
        f.write(summary["report"])
    _plot(run_dir / "selection.png", summary)
    with atomic_file(run_dir / "best") as f:
        f.write(summary["best"] + "\n")


def _markdown(summary: dict) -> str:
    m, lim = summary["metric"], summary["max_general_regression"]
    rule = (f"score = {summary['weights']['domain']} x domain gain - {summary['weights']['general']} x general regression"
            if summary["weights"] else "score = domain gain")
    lines = [f"# Checkpoint selection ({m})", "",
             f"Best: **{summary['best'] or 'none within the limit'}**. Feasible: worst general {m} regression <= {lim:.1%}; "
             f"{rule}; * = Pareto front.", "",
             f"| rank | checkpoint | step | domain {m} gain | general {m} regression | score | feasible | pareto | benchmarks |",
             "|---:|---|---:|---:|---:|---:|:---:|:---:|---|"]
    for c in summary["candidates"]:
        bench = ", ".join(f"{k} {v:.4f}" for k, v in sorted(c.get("benchmarks", {}).items()))
        lines.append(f"| {c['rank']} | {c['iter']} | {c['step']} | {c['domain_gain']:+.2%} | {c['general_regression']:+.2%} "
                     f"| {c['score']:+.4f} | {'yes' if c['feasible'] else 'no'} | {'*' if c['pareto'] else ''} | {bench} |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, summary: dict) -> None:
    from cpt_megatron.eval.plot import pareto_plot

    best = next((c for c in summary["candidates"] if c["iter"] == summary["best"]), None)
    pareto_plot(path, [dict(c, label=c["step"]) for c in summary["candidates"]],
                limit=summary["max_general_regression"], best=str(best["step"]) if best else None,
                metric=summary["metric"], title=f"checkpoints of {path.parent.name} (label: step)")


# -- merge grid: base <-> CPT interpolation (cpt merge) chosen on the same trade-off ---------------------------------
Evaluate = Callable[[Path], dict]
"""evaluate(checkpoint dir) -> {source: {"group": "domain"|"general", metric: value, ...}} (the evals.jsonl
`results` format, lm-eval benchmark rows included); the caller builds it (eval/ must not import train/)."""


def parse_grid(spec: str) -> list[float]:
    """'0.25,0.5,0.75' -> [0.25, 0.5, 0.75]: λ values strictly inside (0, 1) (the ends are always evaluated)."""
    from cpt_megatron.checkpoint.merge import check_weight

    out = []
    for part in str(spec).split(","):
        if not part.strip():
            continue
        lam = check_weight(part.strip(), "--merge-grid")
        if lam in (0.0, 1.0):
            raise CptError(f"--merge-grid {spec!r}: give λ strictly between 0 and 1; λ=0 (the base) and λ=1 (the "
                           "checkpoint) are always evaluated")
        out.append(lam)
    if not out:
        raise CptError(f"--merge-grid {spec!r}: expected comma-separated λ values such as 0.25,0.5,0.75")
    return sorted(set(out))


def run_budget(run_dir: str | Path) -> float:
    """The run's forgetting budget: its recipe's eval.monitor.act (RUN/config.yaml), else the monitor default."""
    from cpt_megatron.eval.plot import run_thresholds

    return run_thresholds(run_dir)[1]


def _merge_dir(run_dir: Path, lam: float) -> Path:
    return run_dir / "merges" / f"lambda_{lam:.4f}".rstrip("0").rstrip(".")


def _reusable(out: Path, base: Path, ckpt: Path, lam: float) -> bool:
    """An earlier merge of the same inputs and λ (complete: tracker + manifest), so a re-run does not redo it."""
    from cpt_megatron.checkpoint import layout
    from cpt_megatron.checkpoint.io import read_meta

    try:
        folder = layout.resolve(out)
        m = read_meta(folder).get("merge") or {}
        return (layout.check_manifest(folder, checksums=False) and m.get("weight") == lam
                and [i["path"] for i in m.get("inputs", [])] == [str(base.resolve()), str(ckpt.resolve())])
    except (CptError, OSError, KeyError, TypeError):
        return False


def select_merge(run_dir: str | Path, *, base: str | Path, grid: list[float], evaluate: Evaluate,
                 ckpt: str | Path | None = None, max_general_regression: float | None = None,
                 weights: dict[str, float] | None = None, metric: str = "ppl", write: bool = True) -> dict:
    """Merge the run's checkpoint with its base at each λ of `grid` (RUN/merges/lambda_X/, `cpt merge`), evaluate
    λ = 0 (the base: the baseline), every λ and λ = 1 (the checkpoint) with `evaluate`, and pick on the Pareto front
    of domain gain vs general regression under the budget (default: the run's eval.monitor.act).

    Writes RUN/merge_selection.{md,png,json} and RUN/best_merge (the chosen checkpoint's path) when one is within
    the budget; "best" None otherwise (nothing written). λ=1 is chosen only when no merge does better."""
    from cpt_megatron.checkpoint import layout
    from cpt_megatron.checkpoint.merge import merge_checkpoints

    run_dir = Path(run_dir)
    base = layout.resolve(base)
    ckpt = layout.resolve(ckpt if ckpt is not None else run_dir / "checkpoints")
    budget = run_budget(run_dir) if max_general_regression is None else max_general_regression
    points = [(0.0, base)]
    for lam in grid:
        out = _merge_dir(run_dir, lam)
        if not _reusable(out, base, ckpt, lam):
            merge_checkpoints([ckpt], out, base=base, weight=lam, overwrite=True)
        points.append((lam, layout.resolve(out)))
    points.append((1.0, ckpt))
    results = {lam: evaluate(path) for lam, path in points}
    baseline = results[0.0]
    cands = []
    for lam, path in points:
        gain, reg = score_results(results[lam], baseline, metric)
        if gain is None or reg is None:
            raise CptError(f"the evaluation of {path} lacks {metric!r} for the domain or general group (sources: "
                           f"{sorted(results[lam])}); evaluate both")
        score = gain if weights is None else weights["domain"] * gain - weights["general"] * reg
        cands.append({"lambda": lam, "ckpt": str(path), "domain_gain": gain, "general_regression": reg,
                      "score": score, "feasible": reg <= budget + 1e-9, "results": results[lam]})
    for c, on_front in zip(cands, pareto_front([(c["domain_gain"], c["general_regression"]) for c in cands])):
        c["pareto"] = on_front
    # on the front, within the budget, best score; ties: less regression, then the smaller λ (closer to the base)
    pick = sorted((c for c in cands if c["pareto"] and c["feasible"] and c["lambda"] > 0),
                  key=lambda c: (-c["score"], c["general_regression"], c["lambda"]))
    best = pick[0] if pick else None
    summary = {"best": best["ckpt"] if best else None, "lambda": best["lambda"] if best else None, "metric": metric,
               "max_general_regression": budget, "weights": weights, "base": str(base), "ckpt": str(ckpt),
               "candidates": cands}
    summary["report"] = _merge_markdown(summary)
    if write and best is not None:
        from cpt_megatron.eval.plot import pareto_plot
        from cpt_megatron.utils import write_json

        with atomic_file(run_dir / "merge_selection.md") as f:
            f.write(summary["report"])
        pareto_plot(run_dir / "merge_selection.png", [dict(c, label=f"λ={c['lambda']:g}") for c in cands],
                    limit=budget, best=f"λ={best['lambda']:g}", metric=metric,
                    title=f"base ↔ {ckpt.parent.name}/{ckpt.name} merges (λ=0 base, λ=1 checkpoint)")
        write_json(run_dir / "merge_selection.json", {k: v for k, v in summary.items() if k != "report"})
        with atomic_file(run_dir / "best_merge") as f:
            f.write(best["ckpt"] + "\n")
        summary["files"] = [str(run_dir / n) for n in ("merge_selection.md", "merge_selection.png",
                                                        "merge_selection.json", "best_merge")]
    return summary


def _merge_markdown(summary: dict) -> str:
    m, lim = summary["metric"], summary["max_general_regression"]
    rule = (f"score = {summary['weights']['domain']} x domain gain - {summary['weights']['general']} x general "
            "regression" if summary["weights"] else "score = domain gain")
    best = f"λ = {summary['lambda']:g} ({summary['best']})" if summary["best"] else "none within the budget"
    lines = [f"# Base ↔ checkpoint merge selection ({m})", "",
             f"w = (1-λ)·base + λ·checkpoint; base {summary['base']}, checkpoint {summary['ckpt']}.", "",
             f"Best: **{best}**. Feasible: worst general {m} regression <= {lim:.1%} (the forgetting budget); {rule}; "
             "chosen on the Pareto front (*).", "",
             f"| λ | domain {m} gain | general {m} regression | score | feasible | pareto | checkpoint |",
             "|---:|---:|---:|---:|:---:|:---:|---|"]
    for c in summary["candidates"]:
        lines.append(f"| {c['lambda']:g} | {c['domain_gain']:+.2%} | {c['general_regression']:+.2%} | "
                     f"{c['score']:+.4f} | {'yes' if c['feasible'] else 'no'} | {'*' if c['pareto'] else ''} | "
                     f"{c['ckpt']} |")
    return "\n".join(lines) + "\n"
