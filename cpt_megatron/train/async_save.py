"""`checkpoint.async_save: true`: megatron-core's asynchronous dist-checkpoint save.

`dist_checkpointing.save(..., async_sharded_save=True)` stages this rank's shards to host memory (the only part
the training step waits for), then a background process writes them; the request's finalize functions (ours:
metadata files, the rename of `.iter_N.tmp` to `iter_N`, `latest`) run on every rank once all ranks' writes are
done, at a later `poll()` (non-blocking, called once per step) or `wait()` (before a load, at exit). A checkpoint
is therefore only visible (renamed, in `latest`) after its finalize: a crash mid-write leaves the previous one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["AsyncCheckpointSaver"]


class AsyncCheckpointSaver:
    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()
        self.pending = 0

    def save(self, sharded_state_dict: dict, tmp_dir: Path, finalize: Callable[[], None]) -> None:
        """Collective: start writing `sharded_state_dict` to `tmp_dir`; `finalize()` runs on every rank when done."""
        from megatron.core import dist_checkpointing

        request = dist_checkpointing.save(sharded_state_dict, str(tmp_dir), async_sharded_save=True)
        request.add_finalize_fn(finalize)
        self.queue.schedule_async_request(request)
        self.pending += 1

    def poll(self) -> int:
        """Collective, non-blocking: finalize the saves every rank has finished; returns how many."""
        if not self.pending:
            return 0
        done = len(self.queue.maybe_finalize_async_calls(blocking=False))
        self.pending -= done
        return done

    def wait(self) -> None:
        """Collective: block until every started save is written and finalized."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=True)
            self.pending = 0

    def close(self) -> None:
        self.wait()
        self.queue.close()
