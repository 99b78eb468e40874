"""The one data-parallel batch splitter of the trainers (`cpt train`, `cpt smoke`).

A global batch is `count` consecutive samples starting at `start`; DP rank r takes the r-th contiguous slice
and cuts it into micro-batches. Validation batches (eval/perplexity.py) are dealt round-robin with padding
instead, because their count need not divide the layout.
"""

from __future__ import annotations

import torch

__all__ = ["rank_slice", "collate", "rank_microbatches"]

FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def rank_slice(start: int, count: int, dp_rank: int, dp: int) -> range:
    """Global sample indices of this DP rank's share of the batch [start, start + count)."""
    per = count // dp
    return range(start + dp_rank * per, start + (dp_rank + 1) * per)


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in FIELDS if k in samples[0]}


def rank_microbatches(dataset, start: int, count: int, dp_rank: int, dp: int, micro: int) -> tuple[list[dict], list]:
    """(micro-batches, samples) of this DP rank for the global batch [start, start + count) of `dataset`."""
    samples = [dataset[i] for i in rank_slice(start, count, dp_rank, dp)]
    return [collate(samples[i:i + micro]) for i in range(0, len(samples), micro)], samples
