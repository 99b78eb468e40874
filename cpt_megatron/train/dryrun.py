"""`cpt train --dry-run`: resolve a recipe and check it without training or writing anything.

It runs the same checks as `cpt train` (train/checks.py: layout, batch divisibility, TP vs heads, sequence
length, kernels spec, monitor settings, curriculum phases, EWC) plus: every data path and the base model
exist, the prepared data (when `cpt prepare` has run) still matches the recipe and fits the model's
vocabulary, and the memory per GPU from the estimator. All problems are reported together.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpt_megatron.config import RecipeConfig, to_dict
from cpt_megatron.errors import CptError

__all__ = ["dry_run", "format_dry_run"]


def dry_run(cfg: RecipeConfig, nproc: int | None = None, gpu: str = "h100", *, recipe: str | None = None,
            overrides: list[str] | None = None) -> dict:
    from cpt_megatron.train.checks import layout, recipe_problems
    from cpt_megatron.train.plan import plan_steps
    from cpt_megatron.train.prepare import load_prepared, manifest_path, prepare_command

    p, t = cfg.parallel, cfg.train
    world = nproc or int(os.environ.get("WORLD_SIZE", "0") or 0) or p.tp * p.pp * p.cp
    dp = layout(cfg, world)[0] or 1
    arch, problems = _arch(cfg)
    prepared, notes = None, []
    command = prepare_command(recipe, overrides)
    if manifest_path(cfg).is_file():
        try:
            prepared = load_prepared(cfg, command)
        except CptError as e:
            problems.append(str(e))
    else:
        notes.append(f"data not prepared yet: run `{command}` before training")
    problems += recipe_problems(cfg, world, arch, prepared)
    problems += _missing_paths(cfg, arch)
    out = {"world_size": world, "tp": p.tp, "pp": p.pp, "dp": dp, "global_batch": t.global_batch,
           "tokens_per_step": t.global_batch * cfg.data.seq_len, "steps": plan_steps(cfg),
           "micro_batches_per_step": t.global_batch // max(1, t.micro_batch * dp), "prepared": prepared is not None}
    if arch is not None:
        out.update(_memory(cfg, arch, dp, gpu))
    if problems:
        raise CptError("recipe check failed: " + "; ".join(dict.fromkeys(problems)))
    out["ok"], out["notes"] = True, notes
    out["config"] = to_dict(cfg)
    return out


def format_dry_run(r: dict) -> str:
    """The human summary `cpt train --dry-run` prints (without --json)."""
    lines = [f"recipe ok: {r['world_size']} processes = tp {r['tp']} x pp {r['pp']} x dp {r['dp']}",
             f"  {r['steps']} steps x {r['global_batch']} sequences ({r['tokens_per_step']:,} tokens/step, "
             f"{r['steps'] * r['tokens_per_step']:,} tokens); {r['micro_batches_per_step']} micro-batches per step"]
    if "params" in r:
        lines.append(f"  model {r['params'] / 1e6:,.1f}M parameters; {r['memory_per_gpu_gb']:.1f} GiB per GPU "
                     f"({'fits' if r['fits'] else 'does NOT fit'} a {r['gpu']})")
    lines.append(f"  data {'prepared' if r['prepared'] else 'not prepared'}")
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def _arch(cfg: RecipeConfig):
    """(ModelArch or None, problems) of the recipe's model, without importing anything."""
    from cpt_megatron.model.arch import load_hf_config
    from cpt_megatron.train.prepare import resolve_path

    m = cfg.model
    if m.base:
        from cpt_megatron.checkpoint import arch_from_ckpt, layout

        try:
            return arch_from_ckpt(layout.resolve(m.base)), []
        except CptError as e:
            return None, [f"model.base={m.base}: not a usable checkpoint ({e}); run cpt import-hf first"]
    if m.hf_config or m.hf:
        src = resolve_path(m.hf_config or m.hf)
        if not Path(src).exists():
            return None, [f"model: {src} not found"]
        try:
            return load_hf_config(src), []
        except CptError as e:
            return None, [str(e)]
    return None, []  # gguf: known after `cpt prepare` imports it


def _missing_paths(cfg: RecipeConfig, arch) -> list[str]:
    from cpt_megatron.data.mixture import check_dataset_tokenizer
    from cpt_megatron.train.prepare import resolve_path

    problems = []
    for s in cfg.data.sources:
        if s.prefix and not Path(s.prefix + ".idx").is_file():
            problems.append(f"data.sources[{s.name}].prefix: {s.prefix}.idx not found (run cpt preprocess)")
        elif s.prefix and arch is not None:
            try:
                check_dataset_tokenizer(s.prefix, arch.vocab_size)
            except CptError as e:
                problems.append(f"data.sources[{s.name}]: {e}")
            except (ValueError, OSError) as e:  # e.g. a truncated .idx that numpy cannot map
                problems.append(f"data.sources[{s.name}]: {s.prefix}.bin/.idx unreadable ({e}); re-run cpt preprocess")
        for i in s.inputs:
            if not i.startswith("@") and not Path(resolve_path(i)).exists():
                problems.append(f"data.sources[{s.name}].inputs: {i} not found")
    return problems


def _memory(cfg: RecipeConfig, arch, dp: int, gpu: str) -> dict:
    from cpt_megatron import flops
    from cpt_megatron.estimate import Layout, memory_per_gpu

    p = cfg.parallel
    mem = memory_per_gpu(arch, Layout(tp=p.tp, pp=p.pp, dp=dp, mbs=cfg.train.micro_batch, sp=p.sp),
                         seq_len=cfg.data.seq_len, recompute=cfg.model.options.recompute or "none",
                         distributed_optimizer=p.distributed_optimizer)
    gib = mem.gib()
    return {"params": flops.param_count(arch), "memory_per_gpu_gb": gib["total"], "memory_breakdown_gb": gib,
            "fits": bool(gib["total"] <= flops.gpu_spec(gpu).memory_gib * 0.9), "gpu": gpu}
