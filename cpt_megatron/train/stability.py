"""Stop rules on the loss stream: non-finite gradient streaks (train.max_skipped) and loss spikes
(train.spike_factor x the running mean). Checkpointed (run state `stability`), so a resumed run stops exactly
where an uninterrupted one would."""

from __future__ import annotations

import math

__all__ = ["StabilityGuard"]


class StabilityGuard:
    def __init__(self, max_skipped: int, spike_factor: float):
        self.max_skipped, self.spike_factor = max_skipped, spike_factor
        self.running: float | None = None  # exponential mean of finite losses (0.9 old + 0.1 new)
        self.skipped_streak = 0

    def observe(self, step: int, loss: float, skipped: bool) -> str | None:
        """The stop reason after `step` (None = go on)."""
        self.skipped_streak = self.skipped_streak + 1 if skipped else 0
        stopped = None
        if self.skipped_streak >= self.max_skipped:
            stopped = f"{self.skipped_streak} consecutive non-finite gradient steps (last at step {step})"
        if math.isfinite(loss):
            if self.running is not None and self.spike_factor > 0 and loss > self.spike_factor * self.running:
                stopped = f"loss spike at step {step}: {loss:.4f} > {self.spike_factor} x mean {self.running:.4f}"
            self.running = loss if self.running is None else 0.9 * self.running + 0.1 * loss
        return stopped

    def state_dict(self) -> dict:
        return {"running": self.running, "skipped_streak": self.skipped_streak}

    def load_state_dict(self, state: dict) -> None:
        self.running, self.skipped_streak = state.get("running"), int(state.get("skipped_streak", 0))
