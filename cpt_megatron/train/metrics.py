"""Rank-0 logging: one console line per log step, metrics.jsonl always, TensorBoard and wandb when present.

Metric names are stable: step, loss, lr, grad_norm, tokens_per_s, tflops_per_gpu, mfu, mem_gb, skipped,
plus `mix/<source>` (realized token share in the step). FLOPs/MFU come from cpt_megatron.flops.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cpt_megatron import flops

__all__ = ["MetricsLogger", "gpu_kind", "cut_logs", "LOG_FILES"]

LOG_FILES = ("metrics.jsonl", "evals.jsonl", "events.jsonl")
"""The step-keyed logs a run appends to; `cut_logs` keeps them consistent with the checkpoint resumed."""


def cut_logs(run_dir: Path, step: int | None) -> dict[str, int]:
    """Drop log records the resumed run will write again, so every step appears once.

    `step` = the resumed checkpoint's step: records with step <= `step` stay (the evaluation at a saved step
    ran before its save and is not repeated); None = a start from the base model: all records go (the
    baseline evaluation at step 0 runs again). A torn last line (killed mid-write) goes too. Each file is
    rewritten atomically; returns {file name: records dropped} for the files that changed.
    """
    from cpt_megatron.utils import atomic_file

    dropped = {}
    for name in LOG_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        keep, n = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                n += line.strip() != ""
                continue
            rec_step = rec.get("step") if isinstance(rec, dict) else None
            if step is None or (isinstance(rec_step, int) and rec_step > step):
                n += 1
            else:
                keep.append(line)
        if n:
            with atomic_file(path) as f:
                f.writelines(x + "\n" for x in keep)
            dropped[name] = n
    return dropped


def gpu_kind() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for k in ("h200", "h100", "a100", "b200", "l40s", "a10"):
        if k in name:
            return k
    return "h100"


class MetricsLogger:
    def __init__(self, run_dir: Path, arch, seq_len: int, world_size: int, enabled: bool, tensorboard: bool,
                 wandb: bool, wandb_mode: str, config: dict):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.flops_per_token = flops.train_flops_per_token(arch, seq_len)
        self.world, self.gpu = world_size, gpu_kind()
        self.tb = self.wb = None
        self._t = time.perf_counter()
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None
        if wandb:
            try:
                import wandb as wb

                self.wb = wb.init(dir=str(run_dir), mode=wandb_mode, config=config, resume="allow")
            except ImportError:
                self.wb = None

    def step(self, rec: dict, tokens: int) -> dict:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        tps = tokens / dt if dt > 0 else 0.0
        rec.update(tokens_per_s=round(tps, 1), step_time_s=round(dt, 4),
                   tflops_per_gpu=round(tps * self.flops_per_token / self.world / 1e12, 4),
                   mfu=round(flops.mfu(tps, self.flops_per_token, self.gpu, self.world), 5))
        if torch.cuda.is_available():
            rec["mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if self.enabled:
            self.write(rec)
        return rec

    def write(self, rec: dict, path: Path | None = None) -> None:
        if not self.enabled:
            return
        with open(path or self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if path is None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    if self.tb:
                        self.tb.add_scalar(k, v, rec["step"])
            if self.wb:
                self.wb.log(rec, step=rec["step"])

    def reset_clock(self) -> None:
        self._t = time.perf_counter()

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()
