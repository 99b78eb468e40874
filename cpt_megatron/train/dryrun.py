"""`cpt train --dry-run`: resolve a recipe and check it without training or writing anything.

It runs the same checks as `cpt train` (train/checks.py `recipe_problems`: layout, batch divisibility, every
rule that splits the model over tp/pp/vpp/sp, sequence length, kernels spec, monitor settings, curriculum
phases, EWC) on the model config it can find before anything is imported:

    model.base   the imported checkpoint's config; when the folder does not exist yet, the recipes/models/
                 config its name starts with (ckpts/llama3.1-70b -> recipes/models/llama3.1_70b.json)
    model.gguf   the GGUF's own metadata (read with transformers, no tensors)
    model.hf / model.hf_config   the HF config.json

and prints the layout (layers per stage), the memory of each pipeline stage (estimate.py, the numbers
`cpt estimate` gives for the same layout) and, separately from rule violations, every path the run needs
that does not exist yet (base checkpoint, data prefixes, raw inputs, tokenizer). A recipe with problems or
missing paths fails (exit 2) after the summary is printed.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from cpt_megatron.config import RecipeConfig, to_dict
from cpt_megatron.errors import CptError

__all__ = ["dry_run", "format_dry_run", "failure_line"]


def dry_run(cfg: RecipeConfig, nproc: int | None = None, gpu: str = "h100", *, recipe: str | None = None,
            overrides: list[str] | None = None, strict: bool = True) -> dict:
    """The dry-run report of `cfg` on `nproc` processes. With `strict`, a report that is not ok raises
    `failure_line(report)`; otherwise the caller prints the report and decides."""
    from cpt_megatron.train.checks import eval_paths, layout, recipe_problems
    from cpt_megatron.train.plan import plan_steps
    from cpt_megatron.train.prepare import load_prepared, manifest_path, prepare_command

    p, t = cfg.parallel, cfg.train
    world = nproc or int(os.environ.get("WORLD_SIZE", "0") or 0) or p.tp * p.pp * p.cp
    dp = layout(cfg, world)[0] or 1
    arch, source, problems, missing = _arch(cfg)
    prepared, notes = None, []
    command = prepare_command(recipe, overrides)
    if manifest_path(cfg).is_file():
        try:
            prepared = load_prepared(cfg, command)
        except CptError as e:
            problems.append(str(e))
    else:
        notes.append(f"data not prepared yet: run `{command}` before training")
    problems += recipe_problems(cfg, world, arch, prepared, missing_listed=True)
    more_problems, more_missing = _paths(cfg, arch)
    more_missing += eval_paths(cfg)
    problems, missing = problems + more_problems, missing + more_missing
    micro_batches = t.global_batch // max(1, t.micro_batch * dp)
    out = {"world_size": world, "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "dp": dp,
           "global_batch": t.global_batch, "tokens_per_step": t.global_batch * cfg.data.seq_len,
           "steps": plan_steps(cfg), "micro_batches_per_step": micro_batches, "prepared": prepared is not None,
           "model_source": source}
    if arch is None:
        notes.append("model shape unknown (no config found): no layer layout or memory estimate")
    else:
        out.update(_model_layout(arch, p))
        out.update(_memory(cfg, arch, dp, micro_batches, gpu))
    out["problems"] = list(dict.fromkeys(problems))
    out["missing"] = list(dict.fromkeys(missing))
    out["ok"], out["notes"] = not out["problems"] and not out["missing"], notes
    out["config"] = to_dict(cfg)
    if strict and not out["ok"]:
        raise CptError(failure_line(out))
    return out


def failure_line(r: dict) -> str:
    """The one-line error of a report that is not ok: rule violations first, then the missing paths."""
    parts = list(r["problems"])
    if r["missing"]:
        parts.append(f"{len(r['missing'])} path(s) missing: " + ", ".join(m.split(" (")[0] for m in r["missing"]))
    return "recipe check failed: " + "; ".join(parts)


def format_dry_run(r: dict) -> str:
    """The human summary `cpt train --dry-run` prints (without --json)."""
    vpp = f" (vpp {r['vpp']})" if r["vpp"] else ""
    cp = f" x cp {r['cp']}" if r["cp"] > 1 else ""
    head = "recipe ok" if r["ok"] else "recipe NOT ok"
    lines = [f"{head}: {r['world_size']} processes = tp {r['tp']} x pp {r['pp']}{cp} x dp {r['dp']}{vpp}",
             f"  {r['steps']} steps x {r['global_batch']} sequences ({r['tokens_per_step']:,} tokens/step, "
             f"{r['steps'] * r['tokens_per_step']:,} tokens); {r['micro_batches_per_step']} micro-batches per step"]
    if "params" in r:
        lines.append(f"  model {r['params'] / 1e6:,.1f}M parameters, {r['num_layers']} layers: "
                     f"{r['layers_per_stage']} per pipeline stage"
                     + (f", {r['layers_per_virtual_stage']} per virtual stage" if r["vpp"] else "")
                     + f" (from {r['model_source']})")
        usable = f"{r['gpu']} {r['gpu_memory_gb']:g} GiB, {r['usable_memory_gb']:g} usable"
        lines.append(f"  memory per GPU ({usable}): {r['memory_per_gpu_gb']:.1f} GiB -> "
                     f"{'fits' if r['fits'] else 'does NOT fit'}")
        for name, gib in r["memory_per_stage_gb"].items():
            stage = "every stage" if name == "only" else f"{name} stage"
            lines.append(f"    {stage:<12} {gib['total']:6.1f} GiB = weights {gib['weights']:g} + grads "
                         f"{gib['grads']:g} + optimizer {gib['optimizer']:g} + activations {gib['activations']:g}")
    lines.append(f"  data {'prepared' if r['prepared'] else 'not prepared'}")
    lines += [f"  note: {n}" for n in r["notes"]]
    lines += [f"  problem: {x}" for x in r["problems"]]
    if r["missing"]:
        lines.append("  missing (create these before training):")
        lines += [f"    {m}" for m in r["missing"]]
    return "\n".join(lines)


def _arch(cfg: RecipeConfig):
    """(ModelArch or None, where its config came from, problems, missing paths) of the recipe's model."""
    from cpt_megatron.model.arch import load_hf_config
    from cpt_megatron.train.prepare import resolve_path, resolve_tokenizer

    m = cfg.model
    if m.base:
        from cpt_megatron.checkpoint import arch_from_ckpt, layout

        import_cmd = f"cpt import-hf --hf HF_DIR --out {m.base}"
        if not Path(m.base).exists():
            shape = _shape_config(m.base)
            missing = [f"model.base: {m.base} (create it with `{import_cmd}`)"]
            if shape is None:
                return None, None, [], missing
            return load_hf_config(shape), f"{_rel(shape)}, as model.base does not exist yet", [], missing
        try:
            return arch_from_ckpt(layout.resolve(m.base)), m.base, [], []
        except CptError as e:
            return None, None, [f"model.base={m.base}: not a usable checkpoint ({e}); run `{import_cmd}`"], []
    if m.gguf:
        try:
            gguf = resolve_tokenizer(m.gguf)
        except CptError as e:
            return None, None, [f"model.gguf: {e}"], []
        if not Path(gguf).is_file():
            return None, None, [], [f"model.gguf: {m.gguf}"]
        try:
            return _gguf_arch(gguf), f"the GGUF {Path(gguf).name}", [], []
        except CptError as e:
            return None, None, [f"model.gguf={m.gguf}: {e}"], []
    key = "hf_config" if m.hf_config else "hf"
    src = resolve_path(getattr(m, key))
    if not Path(src).exists():
        return None, None, [], [f"model.{key}: {src}"]
    try:
        return load_hf_config(src), _rel(src), [], []
    except CptError as e:
        return None, None, [str(e)], []


def _shape_config(base: str) -> Path | None:
    """The shipped recipes/models config a base checkpoint's name starts with (longest match), if any:
    ckpts/llama3.1-70b -> llama3.1_70b.json (names compared without case and punctuation)."""
    from cpt_megatron.config import REPO_RECIPES

    def key(name: str) -> str:
        return re.sub(r"[^a-z0-9]", "", name.lower())

    name = key(Path(base).name)
    found = [p for p in (REPO_RECIPES / "models").glob("*.json") if key(p.stem) and name.startswith(key(p.stem))]
    return max(found, key=lambda p: len(key(p.stem)), default=None)


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_arch(gguf: str):
    """ModelArch from a GGUF's metadata without reading tensors or building the tokenizer (transformers'
    GGUF reader takes ~20 s on SmolLM2's 49k-token vocabulary; this takes milliseconds). The GGUF -> HF key
    names are transformers' own table (GGUF_CONFIG_MAPPING), as `cpt prepare` uses when it imports the file."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from cpt_megatron.model.arch import ModelArch

    try:
        meta, tensors = _gguf_metadata(gguf)
        arch = meta["general.architecture"]
        mapping = GGUF_CONFIG_MAPPING[arch]
    except (KeyError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise CptError(f"cannot read the GGUF's model config ({type(e).__name__}: {e}); re-copy the file") from e
    cfg = {"model_type": arch, "architectures": [f"{arch.capitalize()}ForCausalLM"],
           "tie_word_embeddings": "output.weight" not in tensors}
    for key, hf_key in mapping.items():
        if f"{arch}.{key}" in meta and hf_key:
            cfg[hf_key] = meta[f"{arch}.{key}"]
    cfg.setdefault("vocab_size", meta.get("tokenizer.ggml.tokens"))  # the token count (arrays: their length)
    return ModelArch.from_hf_config(cfg, source=gguf)


def _gguf_metadata(path: str) -> tuple[dict, set]:
    """(key -> value, tensor names) of a GGUF v2/v3 file; arrays are read as their length only."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt):
            nonlocal pos
            vals = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return vals[0] if len(vals) == 1 else vals

        def string():
            nonlocal pos
            n = take("Q")
            pos += n
            return bytes(buf[pos - n:pos]).decode()

        def value(kind):
            nonlocal pos
            if kind == 8:
                return string()
            if kind != 9:
                return take(_GGUF_SCALARS[kind])
            elem, count = take("IQ")
            if elem == 8:
                for _ in range(count):
                    n = take("Q")  # (not `pos += take(..)`: take moves pos first)
                    pos += n
            elif elem == 9:
                raise KeyError("nested GGUF arrays")
            else:
                pos += count * struct.calcsize(_GGUF_SCALARS[elem])
            return count

        magic, _version, n_tensors, n_kv = take("4sIQQ")
        if magic != b"GGUF":
            raise KeyError("GGUF magic")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I"))
        tensors = set()
        for _ in range(n_tensors):
            tensors.add(string())
            n_dims = take("I")
            pos += 8 * n_dims + 4 + 8  # dims, type, offset
        return meta, tensors


def _rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        from cpt_megatron.config import REPO_RECIPES

        try:
            return str(Path(p).resolve().relative_to(REPO_RECIPES.parent))
        except ValueError:
            return str(p)


def _paths(cfg: RecipeConfig, arch) -> tuple[list[str], list[str]]:
    """(problems, missing paths) of the data sources and the tokenizer."""
    from cpt_megatron.data.mixture import check_dataset_tokenizer
    from cpt_megatron.train.prepare import resolve_path, resolve_tokenizer

    problems, missing = [], []
    for s in cfg.data.sources:
        if s.prefix and not Path(s.prefix + ".idx").is_file():
            missing.append(f"data.sources[{s.name}].prefix: {s.prefix}.idx (run cpt preprocess)")
        elif s.prefix and arch is not None:
            try:
                check_dataset_tokenizer(s.prefix, arch.vocab_size)
            except CptError as e:
                problems.append(f"data.sources[{s.name}]: {e}")
            except (ValueError, OSError) as e:  # e.g. a truncated .idx that numpy cannot map
                problems.append(f"data.sources[{s.name}]: {s.prefix}.bin/.idx unreadable ({e}); re-run cpt preprocess")
        for i in s.inputs:
            if not i.startswith("@") and not Path(resolve_path(i)).exists():
                missing.append(f"data.sources[{s.name}].inputs: {i}")
    if cfg.model.tokenizer:
        try:
            tok = resolve_tokenizer(cfg.model.tokenizer)
        except CptError as e:
            problems.append(f"model.tokenizer: {e}")
        else:
            if not Path(tok).exists():
                missing.append(f"model.tokenizer: {cfg.model.tokenizer}")
    return problems, missing


def _model_layout(arch, p) -> dict:
    per_stage = arch.num_layers // p.pp
    return {"num_layers": arch.num_layers, "layers_per_stage": per_stage,
            "layers_per_virtual_stage": per_stage // p.vpp if p.vpp else per_stage}


def _memory(cfg: RecipeConfig, arch, dp: int, micro_batches: int, gpu: str) -> dict:
    """Memory per GPU of each pipeline stage kind, as `cpt estimate` computes it for this layout."""
    from cpt_megatron import flops
    from cpt_megatron.estimate import DEFAULT_HEADROOM, Layout, memory_per_stage

    p = cfg.parallel
    stages = memory_per_stage(arch, Layout(tp=p.tp, pp=p.pp, cp=p.cp, dp=dp, vp=p.vpp or 1,
                                           mbs=cfg.train.micro_batch, sp=p.sp),
                              seq_len=cfg.data.seq_len, recompute=cfg.model.options.recompute or "none",
                              distributed_optimizer=p.distributed_optimizer, num_microbatches=micro_batches)
    gib = {name: mb.gib() for name, mb in stages.items()}
    worst = max(stages, key=lambda name: stages[name].total)
    spec = flops.gpu_spec(gpu)
    usable = spec.memory_gib * (1 - DEFAULT_HEADROOM)
    return {"params": flops.param_count(arch), "memory_per_gpu_gb": gib[worst]["total"],
            "memory_breakdown_gb": gib[worst], "memory_per_stage_gb": gib, "worst_stage": worst,
            "fits": bool(gib[worst]["total"] <= usable), "gpu": gpu, "gpu_memory_gb": spec.memory_gib,
            "usable_memory_gb": round(usable, 1)}
