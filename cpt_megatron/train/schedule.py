"""Learning-rate schedules as pure functions of the step (unit-tested; drawn by `cpt schedule`).

The LR is recomputed from the *current* config at every step and written into the optimizer's param
groups, so changing lr / min_lr / schedule on resume takes effect at the next step (unlike Megatron-LM,
which keeps the checkpoint's max_lr/min_lr in the param groups: NVIDIA/Megatron-LM#1138). The step count
and the optimizer moments are kept; only the curve changes.
"""

from __future__ import annotations

import math

from cpt_megatron.config import ScheduleConfig

__all__ = ["ScheduleConfig", "lr_at", "warmup_steps"]


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
