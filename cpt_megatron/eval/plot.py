"""`cpt plot`: training curves and forgetting curves of a run directory (PNGs in RUN/plots/).

- loss.png: training loss and learning rate over steps (RUN/metrics.jsonl), events marked.
- evals.png: per-source relative change of the eval metric vs. the base model (step 0, RUN/evals.jsonl),
  domain and general panels; the general panel shows the warn/act thresholds (RUN/config.yaml
  `monitor` section, else the defaults) and the monitor's warn/act events (RUN/events.jsonl).
- benchmarks.png: lm-eval benchmark scores (eval.benchmarks) over steps with their stderr error bars.
"""

from __future__ import annotations

from pathlib import Path

from cpt_megatron.eval.monitor import MonitorConfig
from cpt_megatron.utils import read_jsonl, read_yaml

__all__ = ["plot_run", "run_thresholds", "pareto_plot"]

_EVENT_STYLE = {"warn": ("C1", ":"), "act": ("C3", "--")}


def _read(path: Path) -> list[dict]:
    return read_jsonl(path, "run log") if path.is_file() else []


def _find_monitor(cfg) -> dict | None:
    if isinstance(cfg, dict):
        if isinstance(cfg.get("monitor"), dict):
            return cfg["monitor"]
        for v in cfg.values():
            if (found := _find_monitor(v)) is not None:
                return found
    return None


def run_thresholds(run_dir: str | Path) -> tuple[float, float]:
    """(warn, act) from RUN/config.yaml's `monitor` section (at any depth), else MonitorConfig defaults."""
    d = MonitorConfig()
    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        mon = _find_monitor(read_yaml(path, "run config")) or {}
        return float(mon.get("warn", d.warn)), float(mon.get("act", d.act))
    return d.warn, d.act


def plot_run(run_dir: str | Path, *, metric: str = "ppl") -> dict:
    """Write RUN/plots/*.png; returns {"plots": [paths], "steps_metrics": n, "evals": n, "events": n}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    metrics = _read(run_dir / "metrics.jsonl")
    evals = _read(run_dir / "evals.jsonl")
    events = [e for e in _read(run_dir / "events.jsonl") if e.get("kind") in ("warn", "act")]
    if not metrics and not evals:
        raise FileNotFoundError(f"{run_dir} has neither metrics.jsonl nor evals.jsonl; is it a `cpt train` run directory?")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    def mark_events(ax):
        for kind, (color, ls) in _EVENT_STYLE.items():
            steps = sorted({e["step"] for e in events if e["kind"] == kind})
            for i, s in enumerate(steps):
                ax.axvline(s, color=color, ls=ls, lw=0.9, label=f"{kind} event" if i == 0 else None)
        for e in events:
            if e.get("action"):
                ax.annotate(e["action"], (e["step"], 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                            va="top", ha="right", color="C3")

    if metrics:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [m["step"] for m in metrics if m.get("loss") is not None]
        ax.plot(steps, [m["loss"] for m in metrics if m.get("loss") is not None], color="C0", lw=1, label="train loss")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even for short runs
        ax.set_ylabel("loss (nats/token)")
        mark_events(ax)
        lr = [(m["step"], m["lr"]) for m in metrics if m.get("lr") is not None]
        handles, labels = ax.get_legend_handles_labels()
        if lr:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in lr], [v for _, v in lr], color="C2", lw=1, label="lr")
            ax2.set_ylabel("learning rate")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        # one legend above the axes: it never hides the curves (both axes share it)
        ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=4, fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
        save(fig, "loss.png")

    by_step = {}
    for rec in evals:
        by_step[int(rec["step"])] = rec["results"]  # last evaluation per step wins
    if by_step and 0 in by_step:
        base = by_step[0]
        warn, act = run_thresholds(run_dir)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for ax, group in zip(axes, ("domain", "general")):
            for src, b in sorted(base.items()):
                if b.get("group") != group or b.get(metric) is None:
                    continue
                pts = sorted((s, r[src][metric]) for s, r in by_step.items() if r.get(src, {}).get(metric) is not None)
                ax.plot([s for s, _ in pts], [100 * (v - b[metric]) / b[metric] for _, v in pts], "o-", ms=3, label=src)
            ax.axhline(0, color="0.5", lw=0.8)
            if group == "general":
                ax.axhline(100 * warn, color="C1", ls=":", lw=1, label=f"warn {warn:.0%}")
                ax.axhline(100 * act, color="C3", ls="--", lw=1, label=f"act {act:.0%}")
                mark_events(ax)
            ax.set_title(f"{group}: {metric} change vs base (%)")
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "evals.png")
    benches = sorted(src for src, b in by_step.get(0, {}).items() if b.get("benchmark"))
    if benches:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, src in enumerate(benches):
            m = by_step[0][src]["watch"]
            pts = sorted((s, r[src][m], r[src].get(f"{m}_stderr") or 0.0) for s, r in by_step.items()
                         if r.get(src, {}).get(m) is not None)
            ax.errorbar([s for s, _, _ in pts], [100 * v for _, v, _ in pts], yerr=[100 * e for _, _, e in pts],
                        fmt="o-", ms=3, capsize=3, color=f"C{i}",
                        label=f"{src} {m} ({by_step[0][src].get('group')}, n {by_step[0][src].get('n')})")
            ax.axhline(100 * by_step[0][src][m], color=f"C{i}", ls=":", lw=0.8)
        mark_events(ax)
        ax.set_title("lm-eval benchmarks (error bars: stderr; dotted: base model)")
        ax.set_xlabel("step")
        ax.set_ylabel("score (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "benchmarks.png")
    return {"plots": [str(p) for p in written], "metrics_lines": len(metrics), "evals": len(by_step),
            "events": len(events)}


def pareto_plot(path: str | Path, points: list[dict], *, limit: float | None, best: str | None = None,
                metric: str = "ppl", title: str | None = None) -> Path:
    """Domain gain (y) vs general regression (x), in %, one labelled marker per point, the Pareto front joined,
    the forgetting budget as a dashed line and `best` starred. points: {"label", "domain_gain",
    "general_regression", "pareto"}; optional "general_err" / "domain_err" (fractions) draw error bars.
    Used by `cpt select` (checkpoints, merge grid) and experiments/forgetting.py (arms). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpt_megatron.utils import atomic_file

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs = [100 * p["general_regression"] for p in points]
    ys = [100 * p["domain_gain"] for p in points]
    xerr = [100 * (p.get("general_err") or 0.0) for p in points]
    yerr = [100 * (p.get("domain_err") or 0.0) for p in points]
    if any(xerr) or any(yerr):
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.7", lw=1, capsize=2, zorder=1)
    ax.scatter(xs, ys, c="0.6", s=28, label="candidate", zorder=2)
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["general_regression"])
    ax.plot([100 * p["general_regression"] for p in front], [100 * p["domain_gain"] for p in front], "o-",
            color="C0", label="Pareto front", zorder=3)
    for p, x, y in zip(points, xs, ys):
        ax.annotate(str(p["label"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if limit is not None:
        ax.axvline(100 * limit, color="C3", ls="--", lw=1, label=f"general budget {limit:.1%}")
    for p, x, y in zip(points, xs, ys):
        if best is not None and str(p["label"]) == best:
            ax.scatter([x], [y], marker="*", s=220, color="C1", label=f"best ({best})", zorder=4)
    ax.set_xlabel(f"general {metric} regression vs base (%)")
    ax.set_ylabel(f"domain {metric} gain vs base (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
