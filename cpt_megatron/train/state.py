"""The run's mutable state: one typed `TrainState` plus a registry of stateful components, saved once per checkpoint.

Every part of a run that changes while it trains and is not a tensor of the model or optimizer owns a
`state_dict()` / `load_state_dict()` pair and registers under a stable name (torchtitan's checkpointer shape):

| name          | component                              | what it keeps                                       |
|---------------|----------------------------------------|-----------------------------------------------------|
| `train`       | `TrainState`                           | step, consumed samples (= the data position), mixture phases, lr scale, baseline evaluation |
| `stability`   | `train.stability.StabilityGuard`       | loss-spike running mean, skipped-step streak        |
| `monitor`     | `eval.monitor.ForgettingMonitor`       | actions taken, cooldown, regression history, rollbacks |
| `regularizer` | `train.ewc.Regularizer`                | kind, lambda, Fisher normaliser (a check: anchors and Fisher are recomputed from the base) |
| `recipe`      | `RecipeFingerprint`                    | the settings that fix data order and schedule (a resume names what changed) |

`RunState.state_dict()` is the ONE dict a checkpoint stores (common.pt's `train_state`; `train_state.json`
beside it is a read-only copy of the same dict for people and `jq`, never read back). Resume and rollback
both load it through `RunState.load_state_dict` (a rollback skips the components that must remember it, the
monitor). A component registered after the load (the monitor exists once the baseline does) receives its
saved state at `register`, so adding a component is one line: `run_state.register("name", obj)`.
The benchmark schedule needs no entry: which benchmarks are due is a pure function of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

__all__ = ["Stateful", "TrainState", "RunState", "RecipeFingerprint"]


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass(kw_only=True)
class TrainState:
    """The loop's counters: the only thing the training loop itself mutates (besides the model and optimizer)."""

    step: int = 0
    """Optimizer steps done (skipped non-finite steps included)."""
    consumed_samples: int = 0
    """Global samples consumed: the data position (step k reads samples [k*G, (k+1)*G) of the mixture)."""
    phases: list[dict] = dataclasses.field(default_factory=list)
    """Mixture phases in force (the recipe's data.phases plus any the monitor's 'adapt' added)."""
    lr_scale: float = 1.0
    """Multiplier on the scheduled lr (the monitor's rollback/adapt lr_factor)."""
    baseline: dict | None = None
    """Evaluation results of the base model (step 0): the forgetting monitor's reference."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class RecipeFingerprint:
    """The recipe values that fix which sample each step reads, which lr it uses and which regularizer pulls
    toward the base (train.ewc: switching it on, off or to another lambda on resume is named too).

    Saved with every checkpoint; a resume under a recipe that differs names each change in one line and says
    that it applies from the resumed step (the earlier steps were trained under the saved values)."""

    def __init__(self, cfg, total_steps: int):
        d, t = cfg.data, cfg.train
        self.values = {
            "data.alpha": d.alpha, "data.phases": list(d.phases), "data.seq_len": d.seq_len,
            "data.sources": [{k: v for k, v in dataclasses.asdict(s).items() if k in ("name", "group", "weight")}
                             for s in d.sources],
            "train.global_batch": t.global_batch, "total_steps": total_steps, "run.seed": cfg.run.seed,
            "schedule": dataclasses.asdict(cfg.schedule), "optim.lr": cfg.optim.lr, "optim.min_lr": cfg.optim.min_lr,
            "train.ewc.kind": t.ewc.kind, "train.ewc.lam": t.ewc.lam, "train.ewc.batches": t.ewc.batches,
        }
        self.saved: dict | None = None

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state)

    def changes(self, step: int) -> str | None:
        """One line naming what changed since the checkpoint (None = nothing, or no saved fingerprint)."""
        if not self.saved:
            return None
        diff = [f"{k} {self.saved[k]!r} -> {v!r}" for k, v in self.values.items()
                if k in self.saved and _plain(self.saved[k]) != _plain(v)]
        if not diff:
            return None
        return (f"resume: recipe changed since the checkpoint: {'; '.join(diff)}; the new values apply from step "
                f"{step + 1} (steps 1-{step} were trained under the saved ones)")


def _plain(v: Any) -> Any:
    """Compare tuples/lists and ints/floats alike (a checkpoint's JSON-ish values vs the recipe's)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


class RunState:
    """Name -> stateful component. `state_dict()` is what a checkpoint stores; `load_state_dict()` restores it."""

    def __init__(self):
        self._components: dict[str, Stateful] = {}
        self._pending: dict[str, dict] = {}  # loaded states whose component registers later

    def register(self, name: str, component: Stateful) -> Stateful:
        if not isinstance(component, Stateful):
            raise TypeError(f"run state component {name!r} ({type(component).__name__}) has no state_dict/load_state_dict")
        if name in self._components and self._components[name] is not component:
            raise ValueError(f"run state component {name!r} registered twice")
        self._components[name] = component
        if name in self._pending:
            component.load_state_dict(self._pending.pop(name))
        return component

    def __getitem__(self, name: str) -> Stateful:
        return self._components[name]

    def __contains__(self, name: str) -> bool:
        return name in self._components

    def state_dict(self) -> dict:
        return {name: c.state_dict() for name, c in self._components.items()}

    def load_state_dict(self, state: dict, *, skip: tuple[str, ...] = ()) -> None:
        """Restore every registered component from `state`; states of components not registered yet wait for
        their `register`. Names in `skip` keep their current state (a rollback keeps the monitor's memory)."""
        self._pending = {k: v for k, v in self._pending.items() if k in skip}
        for name, sd in state.items():
            if name in skip or not isinstance(sd, dict):
                continue
            if name in self._components:
                self._components[name].load_state_dict(sd)
            else:
                self._pending[name] = sd


def legacy_train_state(saved: dict) -> dict:
    """A checkpoint written before the run state registry (a flat 5-key dict) as a `RunState` state dict."""
    if "train" in saved and isinstance(saved["train"], dict) and "step" in saved["train"]:
        return saved
    keys = [f.name for f in dataclasses.fields(TrainState)]
    return {"train": {k: saved[k] for k in keys if k in saved}}
