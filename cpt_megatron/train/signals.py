"""Preemption: SIGTERM/SIGUSR1 (Slurm `--signal=B:USR1@...`) -> finish the step, save, exit PREEMPT_EXIT_CODE.

A second signal aborts at once. Ranks agree on stopping through an all-reduce at the step boundary, so
every rank saves the same step even if only some received the signal.
"""

from __future__ import annotations

import os
import signal

import torch

from cpt_megatron.runtime.launch import PREEMPT_EXIT_CODE

__all__ = ["PREEMPT_EXIT_CODE", "PreemptionHandler"]



class PreemptionHandler:
    """Installs its handlers on construction; `restore()` puts the previous ones back (the driver does, in
    `finally`, so a library caller keeps its own handlers after training)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), every: int | None = None):
        self.requested = False
        self.signum = None
        # multi-rank on GPU: agree through one all-reduce (a host sync) every `every` steps only (default 10; Slurm
        # signals well ahead of the kill, --signal=B:USR1@120, so a few steps' delay is harmless); CPU: every step
        from cpt_megatron.runtime.device import on_gpu

        self.every = every or int(os.environ.get("CPT_PREEMPT_CHECK_EVERY", "10" if on_gpu() else "1"))
        self._calls = 0
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)  # second signal: abort now
        self.requested, self.signum = True, signum

    def should_stop(self) -> bool:
        """Collective (call once per step on every rank): True on every rank when any rank got a signal. A single
        process answers at once; several agree every `every`-th call (same call count on every rank)."""
        self._calls += 1
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return self.requested
        if self._calls % self.every:
            return False
        from cpt_megatron.runtime.device import comm_device

        flag = torch.tensor([1.0 if self.requested else 0.0], device=comm_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
