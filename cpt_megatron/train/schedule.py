"""Learning-rate schedules as pure functions of the step (unit-tested; drawn by `cpt schedule`).

The LR is recomputed from the *current* config at every step and written into the optimizer's param
groups, so changing lr / min_lr / schedule on resume takes effect at the next step (unlike Megatron-LM,
which keeps the checkpoint's max_lr/min_lr in the param groups: NVIDIA/Megatron-LM#1138). The step count
and the optimizer moments are kept; only the curve changes.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["ScheduleConfig", "lr_at", "warmup_steps"]


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    type: str = "cosine"
    """cosine (re-warm then cosine to min_lr: the CPT default) | wsd (warmup-stable-decay) | constant."""
    warmup: float = 0.01
    """Warmup length: a fraction of the run if < 1, else a number of steps."""
    warmup_init_lr: float = 0.0
    """LR at step 0 of the re-warmup."""
    wsd_decay_fraction: float = 0.2
    """WSD: fraction of the run spent decaying at the end."""
    wsd_decay_shape: str = "linear"
    """WSD decay shape: linear | cosine | sqrt (1 - sqrt), see MiniCPM / Hägele et al. 2024."""

    def __post_init__(self):
        if self.type not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule.type must be cosine|wsd|constant, got {self.type!r}")
        if self.warmup < 0:
            raise ValueError(f"schedule.warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.wsd_decay_fraction <= 1:
            raise ValueError(f"schedule.wsd_decay_fraction must be in [0, 1], got {self.wsd_decay_fraction}")
        if self.wsd_decay_shape not in ("linear", "cosine", "sqrt"):
            raise ValueError(f"schedule.wsd_decay_shape must be linear|cosine|sqrt, got {self.wsd_decay_shape!r}")


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, cfg: ScheduleConfig, *, lr: float, min_lr: float, total_steps: int) -> float:
    """LR used for optimizer step `step` (0-based) of a run of `total_steps` steps."""
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return cfg.warmup_init_lr + (lr - cfg.warmup_init_lr) * step / w
    if cfg.type == "constant":
        return lr
    last = max(total_steps - 1, w)
    if cfg.type == "cosine":
        ratio = 1.0 if last == w else min(1.0, (step - w) / (last - w))
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * ratio))
    # wsd: stable at lr, then decay over the last wsd_decay_fraction of the run to min_lr at the last step
    decay = max(1, int(round(cfg.wsd_decay_fraction * total_steps)))
    start = max(w, total_steps - decay)
    if step < start:
        return lr
    ratio = min(1.0, (step - start) / max(1, last - start))
    if cfg.wsd_decay_shape == "linear":
        f = 1 - ratio
    elif cfg.wsd_decay_shape == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * ratio))
    else:
        f = 1 - math.sqrt(ratio)
    return min_lr + (lr - min_lr) * f
