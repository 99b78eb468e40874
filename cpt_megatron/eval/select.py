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
from pathlib import Path

from cpt_megatron.errors import CptError
from cpt_megatron.utils import atomic_file, read_jsonl

__all__ = ["select_checkpoint", "load_evals", "list_checkpoints", "score_results", "pareto_front", "parse_weights"]

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = summary["candidates"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs = [100 * c["general_regression"] for c in cands]
    ys = [100 * c["domain_gain"] for c in cands]
    ax.scatter(xs, ys, c="0.6", s=28, label="checkpoint", zorder=2)
    front = sorted((c for c in cands if c["pareto"]), key=lambda c: c["general_regression"])
    ax.plot([100 * c["general_regression"] for c in front], [100 * c["domain_gain"] for c in front], "o-", color="C0",
            label="Pareto front", zorder=3)
    for c in cands:
        ax.annotate(str(c["step"]), (100 * c["general_regression"], 100 * c["domain_gain"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axvline(100 * summary["max_general_regression"], color="C3", ls="--", lw=1, label="general limit")
    if summary["best"]:
        b = next(c for c in cands if c["iter"] == summary["best"])
        ax.scatter([100 * b["general_regression"]], [100 * b["domain_gain"]], marker="*", s=220, color="C1",
                   label=f"best ({b['iter']})", zorder=4)
    m = summary["metric"]
    ax.set_xlabel(f"general {m} regression vs base (%)")
    ax.set_ylabel(f"domain {m} gain vs base (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
