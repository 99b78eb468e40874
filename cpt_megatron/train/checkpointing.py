"""Training checkpoints: megatron-core dist_checkpointing, atomic (temp dir + rename, `latest` written last).

Layout: RUN/checkpoints/iter_0000010/ holds model tensors (same unprefixed keys as an imported base, so
`cpt export-hf` and `load_model_weights` read it), optimizer state (resharded on load: any TP/PP/DP),
per-rank RNG states, and the common train state (step, consumed samples, data phases, config).
A copy of the base's cpt_meta.json and tokenizer/ sits next to the tensors so every checkpoint describes
itself. RUN/checkpoints/latest names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "iter_name", "prune_checkpoints"]


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    f = Path(run_dir) / "checkpoints" / "latest"
    if not f.is_file():
        return None
    p = f.parent / f.read_text().strip()
    return p if p.is_dir() else None


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(s: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def _state_dict(engine, is_loading: bool, rng: dict | None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(engine.chunks)}
    meta = {"distrib_optim_sharding_type": "fully_sharded_model_space"}
    sd["optimizer"] = engine.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=meta)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sd["rng_state"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return sd


def save_checkpoint(run_dir, step: int, engine, common: dict, base_ckpt: str | None, saver=None) -> Path:
    """Collective. Returns the final checkpoint dir. With `saver` (train/async_save.AsyncCheckpointSaver,
    checkpoint.async_save) the write runs in the background and the dir appears when the saver finalizes it."""
    from megatron.core import dist_checkpointing

    engine.sync_params()  # overlapped param all-gather (distributed optimizer on GPU) finished before saving
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / iter_name(step), root / f".{iter_name(step)}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    sd = _state_dict(engine, False, _rng_state())
    sd["train_state"] = {**common, "world_size": torch.distributed.get_world_size()}
    if saver is not None:
        saver.save(sd, tmp, lambda: _finish_save(root, final, tmp, common, base_ckpt))
        return final
    dist_checkpointing.save(sd, str(tmp))
    _finish_save(root, final, tmp, common, base_ckpt)
    return final


def _finish_save(root: Path, final: Path, tmp: Path, common: dict, base_ckpt: str | None) -> None:
    """Collective: metadata files, then the atomic rename of the written tmp dir and `latest` (rank 0)."""
    from cpt_megatron.utils import atomic_file

    rank = torch.distributed.get_rank()
    torch.distributed.barrier()
    if rank == 0:
        if base_ckpt:
            for name in ("cpt_meta.json", "tokenizer"):
                src = Path(base_ckpt) / name
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
                elif src.is_file():
                    shutil.copy(src, tmp / name)
        with open(tmp / "train_state.json", "w") as f:
            json.dump(common, f, indent=2, default=str)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_file(root / "latest") as f:
            f.write(final.name + "\n")
    torch.distributed.barrier()


def load_checkpoint(ckpt_dir, engine) -> dict:
    """Collective: restore model, optimizer and (same world size) RNG; returns the common train state."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))["train_state"]
    same_world = common.get("world_size") == torch.distributed.get_world_size()
    sd = _state_dict(engine, True, None)
    if not same_world:
        del sd["rng_state"]  # different layout: RNG streams cannot be mapped (dropout-free CPT is unaffected)
    loaded = dist_checkpointing.load(sd, str(ckpt_dir))
    for i, c in enumerate(engine.chunks):
        c.load_state_dict(loaded[f"model{i}"], strict=False)
    engine.optimizer.load_state_dict(loaded["optimizer"])
    if same_world:
        _set_rng_state(loaded["rng_state"])
    return common


def prune_checkpoints(run_dir, keep_last: int, milestones: list[int]) -> None:
    root = Path(run_dir) / "checkpoints"
    dirs = sorted(p for p in root.glob("iter_*") if p.is_dir())
    keep = {p for p in dirs[-keep_last:]} if keep_last > 0 else set(dirs)
    best = root.parent / "best"
    if best.is_file():
        keep.add(root / best.read_text().strip())
    for p in dirs:
        if p not in keep and int(p.name.split("_")[1]) not in set(milestones):
            shutil.rmtree(p, ignore_errors=True)
