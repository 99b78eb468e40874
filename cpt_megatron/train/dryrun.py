"""`cpt train --dry-run`: resolve a recipe and check it without training.

Checks: the layout divides the world size (WORLD_SIZE / --nproc / recipe `parallel`), the global batch divides
micro_batch x dp, the model config maps (TP vs heads), memory per GPU via the estimator, and that every data
path and the base checkpoint exist. All problems are reported together.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpt_megatron.config import RecipeConfig, to_dict
from cpt_megatron.errors import CptError

__all__ = ["dry_run"]


def dry_run(cfg: RecipeConfig, nproc: int | None = None, gpu: str = "h100") -> dict:
    from cpt_megatron import flops
    from cpt_megatron.estimate import Layout, memory_per_gpu
    from cpt_megatron.model.arch import load_hf_config
    from cpt_megatron.train.driver import plan_steps
    from cpt_megatron.train.prepare import resolve_path

    problems, notes = [], []
    p = cfg.parallel
    world = nproc or int(os.environ.get("WORLD_SIZE", "0") or 0) or p.tp * p.pp
    dp = world // (p.tp * p.pp) if world % (p.tp * p.pp) == 0 else None
    if dp is None:
        problems.append(f"world size {world} is not divisible by tp*pp = {p.tp * p.pp}")
        dp = 1
    G, mb = cfg.train.global_batch, cfg.train.micro_batch
    if G % (mb * dp):
        problems.append(f"train.global_batch={G} is not divisible by micro_batch*dp = {mb}*{dp}")
    arch = None
    m = cfg.model
    if m.base:
        from cpt_megatron.checkpoint import arch_from_ckpt, layout

        try:
            arch = arch_from_ckpt(layout.resolve(m.base))
        except CptError as e:
            problems.append(f"model.base={m.base}: not a usable checkpoint ({e}); run cpt import-hf first")
    elif m.hf_config or m.hf:
        src = resolve_path(m.hf_config or m.hf)
        if not Path(src).exists():
            problems.append(f"model: {src} not found")
        else:
            arch = load_hf_config(src)
    if arch is not None:
        try:
            arch.check_parallel(p.tp)
            arch.check_seq_len(cfg.data.seq_len)
        except CptError as e:
            problems.append(str(e))
    for s in cfg.data.sources:
        if s.prefix and not Path(s.prefix + ".idx").is_file():
            problems.append(f"data.sources[{s.name}].prefix: {s.prefix}.idx not found (run cpt preprocess)")
        for i in s.inputs:
            if not i.startswith("@") and not Path(resolve_path(i)).exists():
                problems.append(f"data.sources[{s.name}].inputs: {i} not found")
    out = {"world_size": world, "tp": p.tp, "pp": p.pp, "dp": dp, "global_batch": G,
           "tokens_per_step": G * cfg.data.seq_len, "steps": plan_steps(cfg),
           "micro_batches_per_step": G // max(1, mb * dp)}
    if arch is not None:
        mem = memory_per_gpu(arch, Layout(tp=p.tp, pp=p.pp, dp=dp, mbs=mb, sp=p.sp), seq_len=cfg.data.seq_len,
                             recompute=cfg.model.options.recompute or "none",
                             distributed_optimizer=p.distributed_optimizer)
        spec = flops.gpu_spec(gpu)
        gib = mem.gib()
        out.update(params=flops.param_count(arch), memory_per_gpu_gb=gib["total"], memory_breakdown_gb=gib,
                   fits=bool(gib["total"] <= spec.memory_gib * 0.9), gpu=gpu)
    if problems:
        raise CptError("recipe check failed: " + "; ".join(problems))
    out["ok"], out["notes"] = True, notes
    out["config"] = to_dict(cfg)
    return out
