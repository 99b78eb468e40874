"""Forgetting monitor: relative regression of general-ability metrics vs. the base model, and what to do.

Pure logic (no torch, no I/O): the training driver calls `observe(step, results)` after each
evaluation, appends every returned event to RUN/events.jsonl, prints `Event.format()` lines, and
executes the action of the (at most one) event that carries one.

Regression of one metric of one general source, relative to the baseline (step 0 = base model):
    lower-is-better (ppl, loss, bits_per_byte, bits_per_char): (value - base) / base
    higher-is-better (acc, acc_norm):                          (base - value) / base
Level: regression >= act -> "act"; >= warn -> "warn"; else "ok" (a non-finite value is "act").

Benchmarks (lm-eval scores, results entries with "benchmark": true) are watched on their own metric
("watch", e.g. acc) with its direction from lm-eval's higher_is_better, and they carry a standard error
(binomial for accuracies). A warn/act crossing whose absolute change is within noise_z x the combined
stderr sqrt(se_base^2 + se_now^2) is kind "noise": reported, never acted on (1,000 questions at p=0.5 have
a 1.6-point stderr: a 2-point "drop" there is not evidence of forgetting). A benchmark that is not due at
an evaluation (its own interval) is skipped there.

Action rule (no action spam):
- at most ONE action per evaluation: on the event with the largest regression at the "act" level;
  other events at that level keep kind "act" with action None;
- after an action, the next `cooldown_evals` evaluations take none (kind "act", action None,
  params {"suppressed": "cooldown"}), so a rollback or a new replay phase can take effect;
- after `max_actions` actions, none are taken (params {"suppressed": "max_actions"});
- policy "warn" never acts; "stop" acts once (the driver stops).

State (`state_dict()` / `load_state_dict()`, checkpointed as the run state's `monitor`): the number of actions,
the evaluations since the last one (cooldown), the regression history (rollback targets) and the rollbacks
taken. A resumed run therefore takes exactly the actions an uninterrupted run takes. A rollback is remembered
(`note_rollback`): the evaluations of the abandoned steps leave the history and a step once rolled back to is
never a target again, so a run cannot loop back to the same point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from cpt_megatron.errors import CptError

__all__ = ["MonitorConfig", "Event", "ForgettingMonitor", "POLICIES", "LOWER_IS_BETTER", "HIGHER_IS_BETTER",
           "relative_regression", "benchmark_regression"]

POLICIES = ("warn", "stop", "rollback", "adapt")
LOWER_IS_BETTER = ("ppl", "loss", "bits_per_byte", "bits_per_char")
HIGHER_IS_BETTER = ("acc", "acc_norm")
KINDS = ("baseline", "ok", "noise", "warn", "act")
_EPS = 1e-9  # 10.2 vs 10.0 is (10.2-10)/10 = 0.0199999... in floats: it must count as reaching 2%


@dataclasses.dataclass(kw_only=True)
class MonitorConfig:
    """Thresholds and the policy for general-ability regressions (relative to the base model)."""

    warn: float = 0.02
    """Relative regression at which an event is a warning (0.02 = 2% worse than the base model)."""
    act: float = 0.03
    """Relative regression at which the policy acts (must be >= warn)."""
    policy: str = "warn"
    """What to do at `act`: 'warn' (log only), 'stop' (end the run), 'rollback' (reload the best checkpoint
    so far and scale lr by lr_factor), 'adapt' (raise the replay share by replay_step from now on; with
    adapt_lr also scale lr by lr_factor)."""
    lr_factor: float = 0.5
    """LR multiplier for 'rollback' (always) and 'adapt' (when adapt_lr), in (0, 1]."""
    replay_step: float = 0.1
    """For 'adapt': alpha (domain share) is lowered by this much, i.e. replay raised, in (0, 1]."""
    adapt_lr: bool = False
    """For 'adapt': also scale lr by lr_factor."""
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["ppl"])
    """Metrics watched on every general source that reports them: ppl, loss, bits_per_byte, bits_per_char
    (lower is better), acc, acc_norm (higher is better). lm-eval benchmarks (eval.benchmarks) are watched on
    their own `metric` whatever this list says."""
    cooldown_evals: int = 1
    """Evaluations after an action during which no new action is taken (0 = act at every evaluation)."""
    max_actions: int | None = None
    """Cap on actions per run; None = unlimited. Further crossings are logged with action None."""
    noise_z: float = 1.0
    """Benchmarks: a crossing within noise_z x the combined standard error of base and current score is
    kind 'noise' (reported, not acted on); 0 = act on any crossing."""

    def __post_init__(self):
        if not 0.0 <= self.warn <= self.act:
            raise CptError(f"monitor.warn={self.warn}, monitor.act={self.act}: need 0 <= warn <= act")
        if self.policy not in POLICIES:
            raise CptError(f"monitor.policy={self.policy!r}: expected one of {POLICIES}")
        if not 0.0 < self.lr_factor <= 1.0:
            raise CptError(f"monitor.lr_factor={self.lr_factor}: must be in (0, 1] (e.g. 0.5 halves the lr)")
        if not 0.0 < self.replay_step <= 1.0:
            raise CptError(f"monitor.replay_step={self.replay_step}: must be in (0, 1] (e.g. 0.1)")
        if isinstance(self.metrics, str):
            self.metrics = [self.metrics]
        self.metrics = list(self.metrics)
        bad = [m for m in self.metrics if m not in LOWER_IS_BETTER + HIGHER_IS_BETTER]
        if bad or not self.metrics:
            raise CptError(f"monitor.metrics={self.metrics}: each must be one of {LOWER_IS_BETTER + HIGHER_IS_BETTER}")
        if self.cooldown_evals < 0:
            raise CptError(f"monitor.cooldown_evals={self.cooldown_evals}: must be >= 0")
        if self.noise_z < 0:
            raise CptError(f"monitor.noise_z={self.noise_z}: must be >= 0 (1.0 = one standard error)")
        if self.max_actions is not None and self.max_actions < 0:
            raise CptError(f"monitor.max_actions={self.max_actions}: must be >= 0 or None")


@dataclasses.dataclass(kw_only=True)
class Event:
    """One monitor decision about one metric of one general source at one evaluation."""

    step: int
    kind: str  # baseline | ok | noise | warn | act
    action: str | None  # None | stop | rollback | adapt
    metric: str
    source: str
    value: float
    baseline: float
    regression: float  # relative, positive = worse than the base model
    threshold: float | None  # the threshold crossed (warn or act), None when ok/baseline
    params: dict = dataclasses.field(default_factory=dict)  # {"lr_factor": .5} / {"alpha_delta": -.1} / {"suppressed": ...}
    stderr: float | None = None  # benchmarks: combined standard error of value - baseline (absolute)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Event:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def format(self) -> str:
        """One progress line, e.g. `step 300 ACT wikitext ppl 23.41 vs 22.70 (+3.1% >= 3.0%) -> rollback lr_factor=0.5`."""
        s = (f"step {self.step} {self.kind.upper()} {self.source} {self.metric} {self.value:.4g} vs {self.baseline:.4g} "
             f"({self.regression:+.1%}")
        s += f" >= {self.threshold:.1%})" if self.threshold is not None else ")"
        if self.stderr is not None:
            s += f" stderr {self.stderr:.4g}"
        if self.kind == "noise":
            s += " (within the stderr: noise, no action)"
        if self.action:
            s += f" -> {self.action} " + " ".join(f"{k}={v}" for k, v in self.params.items())
        elif "suppressed" in self.params:
            s += f" (no action: {self.params['suppressed']})"
        return s


def relative_regression(metric: str, value: float, baseline: float, higher_is_better: bool | None = None) -> float:
    """Positive = worse than baseline, as a fraction of the baseline (direction from the metric's name
    unless given)."""
    if not baseline or not math.isfinite(baseline):
        raise CptError(f"baseline {metric}={baseline}: cannot compute a relative regression from it")
    if higher_is_better if higher_is_better is not None else metric in HIGHER_IS_BETTER:
        return (baseline - value) / baseline
    return (value - baseline) / baseline


def benchmark_regression(base: dict, now: dict, noise_z: float = 1.0) -> tuple[float, float | None, bool]:
    """(relative regression, combined stderr, within the noise) of a benchmark row on its watched metric.

    Within the noise: |now - base| <= noise_z x sqrt(se_base^2 + se_now^2) (False when no stderr is known).
    """
    m = base["watch"]
    value, b = float(now[m]), float(base[m])
    hib = base.get("higher_is_better", {}).get(m)
    if b == 0:  # e.g. accuracy 0 at the base: nothing to lose
        reg = 0.0 if (hib is not False and value >= b) else float("inf")
    else:
        reg = relative_regression(m, value, b, hib)
    se = _combined_stderr(base, now, m)
    noise = se is not None and math.isfinite(reg) and abs(value - b) <= noise_z * se + _EPS
    return reg, se, noise


def _combined_stderr(base: dict, now: dict, metric: str) -> float | None:
    """sqrt(se_base^2 + se_now^2) from lm-eval's `<metric>_stderr` entries; None when either is missing."""
    a, b = base.get(f"{metric}_stderr"), now.get(f"{metric}_stderr")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return math.sqrt(a * a + b * b)


class ForgettingMonitor:
    """Compares each evaluation's general-group metrics with the baseline and decides on actions.

    `baseline` is the results dict of the base model ({source: {"group", "ppl", ...}}, as evaluate_sources
    returns). Watched pairs = (general source, metric in cfg.metrics that the baseline reports).
    """

    def __init__(self, cfg: MonitorConfig, baseline: dict, *, baseline_step: int = 0):
        self.cfg = cfg
        self.baseline = baseline
        self.baseline_step = baseline_step
        self.watched = [(src, m) for src, r in sorted(baseline.items()) if r.get("group") == "general"
                        for m in ([r["watch"]] if r.get("benchmark") else cfg.metrics) if r.get(m) is not None]
        if not self.watched:
            general = [s for s, r in baseline.items() if r.get("group") == "general"]
            raise CptError(f"forgetting monitor: no general source reports any of {cfg.metrics} in the baseline "
                             f"(general sources: {general or 'none'}); add a general validation set or change monitor.metrics")
        self.num_actions = 0
        self._evals_since_action: int | None = None  # None = no action yet
        self.history: list[tuple[int, dict[tuple[str, str], float]]] = []  # (step, regressions)
        self.rollbacks: list[dict] = []  # {"step": evaluated step that acted, "to": step rolled back to}

    # ---- state (checkpointed with the run) ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"num_actions": self.num_actions, "evals_since_action": self._evals_since_action,
                "history": [{"step": s, "regressions": [[src, m, r] for (src, m), r in regs.items()]}
                            for s, regs in self.history],
                "rollbacks": [dict(r) for r in self.rollbacks]}

    def load_state_dict(self, state: dict) -> None:
        self.num_actions = int(state.get("num_actions", 0))
        self._evals_since_action = state.get("evals_since_action")
        self.history = [(int(h["step"]), {(src, m): float(r) for src, m, r in h["regressions"]})
                        for h in state.get("history", [])]
        self.rollbacks = [dict(r) for r in state.get("rollbacks", [])]

    def note_rollback(self, step: int, target: int) -> None:
        """The run went back from `step` to the checkpoint at `target`: forget the abandoned evaluations."""
        self.rollbacks.append({"step": int(step), "to": int(target)})
        self.history = [(s, regs) for s, regs in self.history if s <= target]

    # ---------------------------------------------------------------------------------------------
    def observe(self, step: int, results: dict) -> list[Event]:
        """Events for every watched (source, metric) at this evaluation; at most one carries an action."""
        cfg = self.cfg
        if step == self.baseline_step:
            return [Event(step=step, kind="baseline", action=None, metric=m, source=s, value=self.baseline[s][m],
                          baseline=self.baseline[s][m], regression=0.0, threshold=None) for s, m in self.watched]
        events = []
        for src, m in self.watched:
            bench = self.baseline[src].get("benchmark")
            if bench and src not in results:
                continue  # not due at this evaluation (its own interval)
            if src not in results or results[src].get(m) is None:
                raise CptError(f"forgetting monitor: evaluation at step {step} lacks {m!r} for general source "
                                 f"{src!r} (has {sorted(results)}); every evaluation must cover the baseline's sources")
            value, base = float(results[src][m]), float(self.baseline[src][m])
            se, noise = None, False
            if bench:
                reg, se, noise = benchmark_regression(self.baseline[src], results[src], cfg.noise_z)
            else:
                reg = relative_regression(m, value, base)
            if not math.isfinite(reg) or reg >= cfg.act - _EPS:
                kind, thr = "act", cfg.act
            elif reg >= cfg.warn - _EPS:
                kind, thr = "warn", cfg.warn
            else:
                kind, thr = "ok", None
            if kind != "ok" and noise:
                kind = "noise"
            events.append(Event(step=step, kind=kind, action=None, metric=m, source=src, value=value, baseline=base,
                                regression=reg if math.isfinite(reg) else float("inf"), threshold=thr, stderr=se))
        # a crossing within the noise does not count against a checkpoint as a rollback target either
        self.history.append((step, {(e.source, e.metric): 0.0 if e.kind == "noise" else e.regression for e in events}))
        if self._evals_since_action is not None:
            self._evals_since_action += 1
        acting = [e for e in events if e.kind == "act"]
        if acting and cfg.policy != "warn":
            worst = max(acting, key=lambda e: e.regression)
            if self._evals_since_action is not None and self._evals_since_action <= cfg.cooldown_evals:
                worst.params = {"suppressed": "cooldown"}
            elif cfg.max_actions is not None and self.num_actions >= cfg.max_actions:
                worst.params = {"suppressed": "max_actions"}
            elif cfg.policy == "stop" and self.num_actions >= 1:
                worst.params = {"suppressed": "already stopped"}
            else:
                worst.action, worst.params = cfg.policy, self._params()
                self.num_actions += 1
                self._evals_since_action = 0
        return events

    def _params(self) -> dict:
        cfg = self.cfg
        if cfg.policy == "rollback":
            return {"lr_factor": cfg.lr_factor}
        if cfg.policy == "adapt":
            p = {"alpha_delta": -cfg.replay_step}
            if cfg.adapt_lr:
                p["lr_factor"] = cfg.lr_factor
            return p
        return {}

    def worst_regression(self, step: int) -> float | None:
        """Largest watched regression observed at `step` (None if that step was not observed)."""
        for s, regs in reversed(self.history):
            if s == step:
                return max(regs.values(), default=0.0)
        return None

    def rollback_target(self, saved_steps: Iterable[int]) -> int | None:
        """The latest saved step whose worst regression stayed below `warn`; None = none (use the base model).

        "Best so far" for a rollback means the most training progress that had not yet forgotten. A step already
        rolled back to is not a target again (no loop back to the same point).
        """
        used = {r["to"] for r in self.rollbacks}
        ok = [s for s in saved_steps
              if s not in used and (r := self.worst_regression(s)) is not None and r < self.cfg.warn]
        return max(ok) if ok else None
