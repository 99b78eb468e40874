"""Training checkpoints: megatron-core dist_checkpointing, atomic (temp dir + rename, tracker written last).

Layout (checkpoint.layout, Megatron-LM's): RUN/checkpoints/iter_0000010/ holds model tensors (same
unprefixed keys as an imported base, so `cpt export-hf`, `load_model_weights` and Megatron-LM read it),
optimizer state (resharded on load: any TP/PP/DP), per-rank RNG states, and common.pt with the run state
(`train_state`: train/state.RunState's one dict: step, consumed samples, phases, lr scale, baseline, monitor,
stability guard, regularizer, recipe fingerprint) plus Megatron-LM's checkpoint_version/iteration/args (its
iteration and consumed_train_samples taken from that same dict). A copy of the base's cpt_meta.json (with a
`training` section) and tokenizer/, megatron_args.txt and train_state.json (a read-only JSON copy of the run
state for people and jq; nothing reads it back) sit next to the tensors; cpt_manifest.json (sizes + xxh3_64 checksums) is written last inside the folder, then the folder is
renamed into place, then RUN/checkpoints/latest_checkpointed_iteration.txt names it.
`select_resume` picks the newest checkpoint that is complete and verifies (resume=auto).
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from cpt_megatron.checkpoint import layout
from cpt_megatron.checkpoint.layout import iter_name
from cpt_megatron.errors import CptError

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "iter_name", "prune_checkpoints",
           "select_resume", "RESUME_MODES", "read_run_state", "discard_after"]

RESUME_MODES = ("auto", "none", "base")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder the run's tracker names, if it is complete (no integrity check: see select_resume)."""
    try:
        return layout.resolve(Path(run_dir) / "checkpoints")
    except CptError:
        return None


def _problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (None = complete and verified)."""
    if not layout.is_ckpt_folder(folder) or not (folder / "common.pt").is_file():
        return "incomplete (no metadata.json/common.pt)"
    try:
        if not layout.check_manifest(folder) and not (folder / "train_state.json").is_file():
            return "incomplete (no manifest, no train_state.json)"
    except CptError as e:
        return str(e)
    return None


def _scan(run_dir: Path, mode: str) -> tuple[str | None, list[str], str | None]:
    root = run_dir / "checkpoints"
    folders = layout.iteration_folders(root) if root.is_dir() else []
    tracked = None
    try:
        tracked = layout.read_tracker(root) if root.is_dir() else None
    except CptError as e:
        return None, [], str(e)
    if not folders and tracked is None:
        return None, [], None
    if mode == "none":
        return None, [], (f"{run_dir} already has checkpoints ({(folders[-1].name if folders else tracked)}); "
                          "use resume=auto or a new run.dir")
    if mode == "base":
        return None, [f"resume=base: starting from the base model although {root} has checkpoints"], None
    skipped = []
    if tracked is not None and not (root / tracked).is_dir():
        skipped.append(f"{tracked} (named by the tracker): missing")
    for f in reversed(folders):
        why = _problem(f)
        if why is None:
            return str(f), skipped, None
        skipped.append(f"{f.name}: {why}")
    return None, skipped, (f"{root} has checkpoints but none is complete and valid ({'; '.join(skipped)}); "
                           "refusing to restart from the base model over them: pass resume=base to do that, "
                           "or move them away")


def select_resume(run_dir: str | os.PathLike, mode: str = "auto") -> tuple[Path | None, list[str]]:
    """(checkpoint to resume from or None = start from the base, lines saying what was skipped and why).

    auto: the newest iter_* that is complete and passes its manifest (a tracker naming a missing or damaged
    folder never means "start over"); none: refuse when checkpoints exist; base: start from the base anyway.
    Collective when torch.distributed is initialized: rank 0 checks, every rank gets the same answer.
    """
    import torch

    if mode not in RESUME_MODES:
        raise CptError(f"resume={mode!r}: expected one of {', '.join(RESUME_MODES)}")
    dist = torch.distributed.is_initialized()
    res = [None]
    if not dist or torch.distributed.get_rank() == 0:
        res[0] = _scan(Path(run_dir), mode)
    if dist:
        torch.distributed.broadcast_object_list(res, src=0)
    found, skipped, error = res[0]
    if error:
        raise CptError(error)
    return (Path(found) if found else None), skipped


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
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}  # 0.16.1 refuses the deprecated flattened formats
    sd["optimizer"] = engine.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=meta)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sd["rng_state"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return sd


def _training_meta(run_dir: Path, state: dict) -> dict:
    """The `training` section of a trained checkpoint's cpt_meta.json (what the exported model card shows)."""
    train, recipe = state.get("train") or {}, state.get("recipe") or {}
    tr = {"framework": "cpt-megatron (cpt train)", "run": Path(run_dir).name, "step": train.get("step"),
          "consumed_samples": train.get("consumed_samples")}
    if recipe.get("train.global_batch") and recipe.get("data.seq_len") and train.get("step") is not None:
        tr["tokens_trained"] = int(recipe["train.global_batch"]) * int(recipe["data.seq_len"]) * int(train["step"])
    cfg_file = Path(run_dir) / "config.yaml"
    if cfg_file.is_file():
        import yaml

        data = (yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {}
        srcs = data.get("sources") or []
        if srcs:
            tr["mixture"] = {s.get("name", "?"): {k: s.get(k) for k in ("group", "weight", "tokens")} for s in srcs}
        if data.get("alpha") is not None:
            tr["domain_share_alpha"] = data["alpha"]
    if train.get("phases"):  # curriculum or the monitor's added phases: alpha is not constant
        tr["phases"] = train["phases"]
    return tr


def read_run_state(ckpt_dir) -> dict:
    """The run state a checkpoint stores (common.pt's `train_state`; checkpoints from before the run state
    registry come back in its shape). Resume and rollback both read it here."""
    return _run_state(_read_common(layout.resolve(ckpt_dir)))


def _read_common(ckpt_dir: Path) -> dict:
    from megatron.core import dist_checkpointing

    with layout.read_errors(ckpt_dir):
        return dist_checkpointing.load_common_state_dict(str(ckpt_dir))


def _run_state(common: dict) -> dict:
    from cpt_megatron.train.state import legacy_train_state

    return legacy_train_state(common["train_state"])


def save_checkpoint(run_dir, step: int, engine, common: dict, base_ckpt: str | None, saver=None) -> Path:
    """Collective. Returns the final checkpoint dir. `common` = the run state (RunState.state_dict()), stored
    once. With `saver` (train/async_save.AsyncCheckpointSaver, checkpoint.async_save) the write runs in the
    background and the dir appears when the saver finalizes it."""
    from megatron.core import dist_checkpointing

    from cpt_megatron.checkpoint import megatron_lm
    from cpt_megatron.checkpoint.io import TOKENIZER_DIR, read_meta

    engine.sync_params()  # overlapped param all-gather (distributed optimizer on GPU) finished before saving
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / iter_name(step), root / f".{iter_name(step)}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    meta = read_meta(base_ckpt) if base_ckpt else None
    sd = _state_dict(engine, False, _rng_state())
    sd["train_state"] = {**common, "world_size": torch.distributed.get_world_size()}
    if meta is not None:  # what Megatron-LM's load_checkpoint reads (checkpoint_version, iteration, args)
        from megatron.core import parallel_state as ps

        sd.update(megatron_lm.common_entries(
            meta, iteration=step, tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(), tokenizer_model=final.resolve() / TOKENIZER_DIR,
            extra={"consumed_train_samples": int((common.get("train") or {}).get("consumed_samples") or 0)}))
    finish = functools.partial(_finish_save, Path(run_dir), final, tmp, common, base_ckpt, meta)
    if saver is not None:
        saver.save(sd, tmp, finish)
        return final
    dist_checkpointing.save(sd, str(tmp))
    finish()
    return final


def _finish_save(run_dir: Path, final: Path, tmp: Path, common: dict, base_ckpt: str | None,
                 meta: dict | None) -> None:
    """Collective: metadata files and the manifest, then the atomic rename of the written tmp dir and the
    tracker (rank 0)."""
    from cpt_megatron.checkpoint import megatron_lm
    from cpt_megatron.checkpoint.io import META_NAME, TOKENIZER_DIR
    from cpt_megatron.utils import write_json

    rank = torch.distributed.get_rank()
    torch.distributed.barrier()
    if rank == 0:
        if base_ckpt and meta is not None:
            base = layout.resolve(base_ckpt)
            src = base / (meta.get("tokenizer") or TOKENIZER_DIR)
            if src.is_dir():
                shutil.copytree(src, tmp / TOKENIZER_DIR)
            write_json(tmp / META_NAME, dict(meta, tokenizer=TOKENIZER_DIR if src.is_dir() else meta.get("tokenizer"),
                                             training=_training_meta(run_dir, common)))
            megatron_lm.write_args_file(tmp, meta, final)
        train = common.get("train") or {}  # step and samples on top as well: what `jq .step` users read
        with open(tmp / "train_state.json", "w") as f:
            json.dump({"step": train.get("step"), "consumed_samples": train.get("consumed_samples"), **common}, f,
                      indent=2, default=str)
        layout.write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        layout.write_tracker(final.parent, final.name)
    torch.distributed.barrier()


def _check_optimizer_kind(ckpt_dir: Path, saved_common: dict, distributed: bool) -> None:
    """The distributed optimizer's state (fully_reshardable: any TP/PP/DP on load) and the plain optimizer's have
    different layouts that megatron-core 0.16.1 cannot convert (it fails deep inside the load)."""
    def sharded(d) -> bool:  # a ChainedOptimizer of several stores one such dict per optimizer
        return isinstance(d, dict) and ("param_state_sharding_type" in d or any(map(sharded, d.values())))

    saved = sharded(saved_common.get("optimizer"))
    if saved != bool(distributed):
        raise CptError(f"{ckpt_dir} was saved with parallel.distributed_optimizer={str(saved).lower()}; its optimizer "
                       f"state cannot be loaded with {str(bool(distributed)).lower()}: resume with "
                       f"parallel.distributed_optimizer={str(saved).lower()} (any DP size works)")


def load_checkpoint(ckpt_dir, engine) -> dict:
    """Collective: restore model, optimizer and (same world size) RNG; returns the run state (read_run_state)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = layout.resolve(ckpt_dir)
    saved = _read_common(ckpt_dir)
    _check_optimizer_kind(ckpt_dir, saved, engine.parallel.distributed_optimizer)
    common = _run_state(saved)
    same_world = common.get("world_size") == torch.distributed.get_world_size()
    engine.prepare_optimizer_load()
    sd = _state_dict(engine, True, None)
    if not same_world:
        del sd["rng_state"]  # different layout: RNG streams cannot be mapped (dropout-free CPT is unaffected)
    with layout.read_errors(ckpt_dir):
        loaded = dist_checkpointing.load(sd, str(ckpt_dir))
    for i, c in enumerate(engine.chunks):
        c.load_state_dict(loaded[f"model{i}"], strict=False)
    engine.load_optimizer_state(loaded["optimizer"])
    if same_world:
        _set_rng_state(loaded["rng_state"])
    return common


def _remove(folder: Path) -> None:
    """Rename first (atomic), then delete: an `iter_*` folder is either complete or absent, even if the
    deletion is interrupted (the renamed leftover is removed by the next prune)."""
    gone = folder.with_name(f".{folder.name}.removing")
    os.replace(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)


def prune_checkpoints(run_dir, keep_last: int, milestones: list[int], protect: list[int] = ()) -> list[str]:
    """Rank 0: remove complete checkpoints beyond the newest `keep_last` (0 = keep all), except milestones, the
    selected best (RUN/best, `cpt select`) and `protect` (the monitor's rollback target). A save still being
    written (`.iter_N.tmp`, e.g. async) is not a checkpoint yet: never counted, never touched. Returns the
    removed folder names."""
    root = Path(run_dir) / "checkpoints"
    for left in root.glob(".iter_*.removing"):
        shutil.rmtree(left, ignore_errors=True)
    dirs = layout.iteration_folders(root)
    keep = {p for p in dirs[-keep_last:]} if keep_last > 0 else set(dirs)
    best = root.parent / "best"
    if best.is_file():
        keep.add(root / best.read_text().strip())
    keep_steps = {int(s) for s in milestones} | {int(s) for s in protect}
    removed = []
    for p in dirs:
        if p not in keep and int(p.name.split("_")[1]) not in keep_steps:
            _remove(p)
            removed.append(p.name)
    return removed


def discard_after(run_dir, step: int) -> list[str]:
    """Rank 0, after a rollback to `step`: remove the checkpoints of the abandoned steps (> step) and point the
    tracker at `step`, so a requeue resumes the rolled-back run, not the branch it left."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    for p in layout.iteration_folders(root):
        if int(p.name.split("_")[1]) > step:
            _remove(p)
            removed.append(p.name)
    layout.write_tracker(root, iter_name(step))
    return removed
