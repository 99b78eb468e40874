"""Per-step micro-batches for this rank: read ahead by a torch DataLoader on the first TP rank, broadcast over TP.

Which samples a step uses depends only on `consumed_samples` (resume and DP-resize exact): step k of this DP rank
is samples [start + dp_rank * per, start + (dp_rank + 1) * per) with per = global_batch / dp. The DataLoader's
items are whole steps, so its workers (GPU default 2) build the next steps' tensors while the GPU trains, into
pinned memory (GPU) for asynchronous host-to-device copies (`forward_step` moves with non_blocking=True). Only TP
rank 0 of each TP group reads; the other TP ranks receive the same step from it (one broadcast per step over the
TP group), so a TP=8 node reads each sample once instead of eight times. A `get(dataset, start)` that is not the
expected next step (a rollback to the best checkpoint, a new mixture) restarts the read-ahead at `start`.
"""

from __future__ import annotations

import torch

from cpt_megatron.train.batches import rank_microbatches

__all__ = ["StepLoader"]


class _Steps(torch.utils.data.Dataset):
    def __init__(self, dataset, start: int, count: int, dp_rank: int, dp: int, micro: int):
        self.args = (dataset, start, count, dp_rank, dp, micro)

    def __len__(self):
        dataset, start, count = self.args[:3]
        return max(0, (len(dataset) - start) // count)

    def __getitem__(self, k: int):
        dataset, start, count, dp_rank, dp, micro = self.args
        return rank_microbatches(dataset, start + k * count, count, dp_rank, dp, micro)


class StepLoader:
    """`get(dataset, start)` -> (micro-batches, samples) of the step starting at sample `start`, identical to
    `train.batches.rank_microbatches` on every rank of a TP group. Collective over the TP group when tp > 1."""

    def __init__(self, dataset=None, *, global_batch: int, dp_rank: int, dp: int, micro: int, workers: int | None = None,
                 pin_memory: bool | None = None, tp_group=None, tp_src: int = 0, reader: bool = True):
        from cpt_megatron.runtime.device import on_gpu

        self.dataset, self.G, self.dp_rank, self.dp, self.micro = dataset, global_batch, dp_rank, dp, micro
        self.workers = (2 if on_gpu() else 0) if workers is None else workers
        self.pin = on_gpu() if pin_memory is None else pin_memory
        self.tp_group, self.tp_src, self.reader = tp_group, tp_src, reader
        self._next, self._it = None, None

    def _restart(self, start: int) -> None:
        steps = _Steps(self.dataset, start, self.G, self.dp_rank, self.dp, self.micro)
        loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=self.workers,
                                             pin_memory=self.pin, prefetch_factor=2 if self.workers else None,
                                             persistent_workers=False)
        self._it = iter(loader)

    def get(self, dataset, start: int) -> tuple[list[dict], list]:
        """The step at sample `start` of `dataset` (a new dataset, e.g. a re-weighted mixture, restarts the read)."""
        item = None
        if self.reader:
            if self._next != start or self._it is None or dataset is not self.dataset:
                self.dataset = dataset
                self._restart(start)
            try:
                item = next(self._it)
            except StopIteration:  # past the end of the dataset: the plain read raises the dataset's own error
                item = rank_microbatches(self.dataset, start, self.G, self.dp_rank, self.dp, self.micro)
            self._next = start + self.G
        if self.tp_group is not None and torch.distributed.get_world_size(self.tp_group) > 1:
            box = [item]
            torch.distributed.broadcast_object_list(box, src=self.tp_src, group=self.tp_group)
            item = box[0]
        return item

    @classmethod
    def for_this_rank(cls, dataset=None, *, global_batch: int, micro: int, **kw) -> StepLoader:
        """Under megatron's parallel state: DP rank/size from it, TP rank 0 reads and broadcasts to its TP group."""
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        return cls(dataset, global_batch=global_batch, dp_rank=ps.get_data_parallel_rank(),
                   dp=ps.get_data_parallel_world_size(), micro=micro,
                   tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
                   tp_src=ps.get_tensor_model_parallel_src_rank(), reader=ps.get_tensor_model_parallel_rank() == 0, **kw)
