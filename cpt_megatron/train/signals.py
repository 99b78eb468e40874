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

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signum = None
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
        """Collective: True on every rank when any rank got a signal."""
        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
