"""`cpt export-hf`: megatron-core torch_dist checkpoint (imported or trained, any layout) -> HF directory.

Only model keys are read (optimizer state is never touched), one (key, layer) slice at a time.
safetensors shards are written by a streaming writer: shapes are known up front, so each shard's
header is written first and tensor bytes follow one by one. Peak RSS ~ the largest megatron tensor
slice (e.g. one layer's fc1 or the embedding) plus the HF tensor cut from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import torch

from cpt_megatron.checkpoint import mapping
from cpt_megatron.checkpoint.io import (
    DTYPES,
    arch_from_ckpt,
    ckpt_tensor_keys,
    dtype_name,
    open_checkpoint,
    read_ckpt_tensor,
    read_meta,
    single_process_group,
    tokenizer_path,
)
from cpt_megatron.errors import CptError
from cpt_megatron.utils import atomic_dir, parse_size, write_json

__all__ = ["export_hf", "parse_size", "write_safetensors_streaming", "model_card"]

_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors_streaming(path: Path, entries: list[tuple[str, tuple, torch.dtype]], produce) -> None:
    """Write a safetensors file whose tensors come one at a time from `produce(name) -> tensor`."""
    header, offset = {}, 0
    for name, shape, dt in entries:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPE[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dt in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise AssertionError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dt}")
            f.write(t.contiguous().view(torch.uint8).numpy().data)
            del t


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(meta: dict) -> tuple[str | None, str]:
    """(HF hub id for the card's `base_model:` or None, a display name): never a local absolute path."""
    src = meta.get("source", {}) or {}
    for cand in (meta.get("base_model"), (meta.get("hf_config") or {}).get("_name_or_path")):
        if isinstance(cand, str) and _HUB_ID.match(cand) and not Path(cand).exists():
            return cand, cand
    path = src.get("path") or ""
    name = Path(path).stem if src.get("kind") == "gguf" else Path(path).name
    return None, name or "unknown"


def mixture_text(mix, alpha) -> str:
    """'domain 0.70 (stdlib_code 0.70, in-group weight 1.0); general 0.30 (...)': each group's share of the
    training tokens (alpha / 1 - alpha) and each source's share of all tokens, with its weight inside the group."""
    if not isinstance(mix, dict) or not all(isinstance(v, dict) for v in mix.values()) or alpha is None:
        return ", ".join(f"{k}: {v}" for k, v in mix.items()) if isinstance(mix, dict) else str(mix)
    parts = []
    for group, share in (("domain", float(alpha)), ("general", 1 - float(alpha))):
        srcs = {k: v for k, v in mix.items() if v.get("group") == group}
        if not srcs:
            continue
        wsum = sum(float(v.get("weight") or 0) for v in srcs.values() if v.get("tokens") is None)
        cells = [f"{k} {v['tokens']:,} tokens (budget)" if v.get("tokens") is not None else
                 f"{k} {share * float(v.get('weight') or 0) / wsum:.2f} (in-group weight {v.get('weight')})"
                 if wsum and not any(x.get("tokens") is not None for x in srcs.values()) else
                 f"{k} (in-group weight {v.get('weight')})" for k, v in srcs.items()]
        parts.append(f"{group} {share:.2f} ({', '.join(cells)})")
    return "; ".join(parts) + " of training tokens"


def model_card(meta: dict, arch, dtype: str) -> str:
    hub, name = base_model_id(meta)
    lines = ["---", "library_name: transformers"] + ([f"base_model: {hub}"] if hub else []) + [
        "tags: [cpt-megatron, continued-pretraining]",
        "---", "", "# Continued-pretraining checkpoint", "",
        f"Exported by cpt-megatron from a megatron-core checkpoint. Architecture: {arch.model_type}, "
        f"{arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size}, dtype {dtype}.", "",
        f"- Base model: `{name}`" + ("" if hub else " (local checkpoint)"),
    ]
    if meta.get("tokenizer_extension"):
        ext = meta["tokenizer_extension"]
        lines.append(f"- Tokenizer: extended from {ext.get('base_vocab_size')} to {ext.get('vocab_size')} tokens "
                     f"(new rows initialized with `{ext.get('init')}`)")
    tr = meta.get("training") or {}
    if tr:
        if "mixture" in tr:
            lines.append(f"- Data mixture: {mixture_text(tr['mixture'], tr.get('domain_share_alpha'))}"
                         + ("; phases change alpha over the run (below)" if tr.get("phases") else ""))
        if "tokens_trained" in tr:
            lines.append(f"- Tokens trained: {tr['tokens_trained']:,}" if isinstance(tr["tokens_trained"], int)
                         else f"- Tokens trained: {tr['tokens_trained']}")
        for k, v in tr.items():
            if k not in ("mixture", "tokens_trained") and v is not None:
                lines.append(f"- {k}: {v}")
    else:
        lines.append("- Training: none recorded (converted checkpoint)")
    ev = meta.get("eval") or {}
    if ev:
        lines += ["", "## Final evaluation", "", "| metric | value |", "|---|---|"]
        for k, v in ev.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(dir)`.", ""]
    return "\n".join(lines)


def _hf_config(meta: dict, arch, dt: torch.dtype) -> dict:
    cfg = dict(meta["hf_config"])
    cfg["vocab_size"] = arch.vocab_size
    if not cfg.get("architectures"):
        cfg["architectures"] = [_ARCHITECTURES[arch.model_type]]  # vLLM & co. pick the model class from it
    cfg.pop("_name_or_path", None)
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = dtype_name(dt)
    return cfg


def _generation_config(cfg: dict) -> dict:
    out = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    out["transformers_version"] = cfg.get("transformers_version", "")
    return out


def _check_space(out: Path, needed: int) -> None:
    """The new export is written beside the old one (which is retired only once the new is in place): refuse up
    front, in one line, when its tensors cannot fit."""
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise CptError(f"not enough space to export into {out}: {needed:,} bytes needed, {free:,} bytes free (an "
                       "existing export is kept until the new one is complete); free space or use another --out")


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
              max_shard_size: str | int = "5GB", overwrite: bool = False, verify: bool = True,
              verify_tol: float | None = None, tokenizer: str | os.PathLike | None = None) -> dict:
    """Write an HF checkpoint dir at `out` from the megatron checkpoint `ckpt`; returns a summary.

    `ckpt`: ours (any layout) or one Megatron-LM saved (save root or iter folder; TP/PP/bf16/dist-opt);
    `tokenizer` overrides the checkpoint's (needed for a Megatron-LM save whose tokenizer_model is elsewhere)."""
    t0 = time.time()
    ckpt = open_checkpoint(ckpt)
    meta = read_meta(ckpt, tokenizer)
    arch = arch_from_ckpt(ckpt, tokenizer)
    limit = parse_size(max_shard_size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CptError(f"output {out} already exists; pass --overwrite to replace it")
    with single_process_group():
        md = ckpt_tensor_keys(ckpt)
        names = mapping.hf_names(arch)
        if arch.tie_word_embeddings:
            names = [n for n in names if n != "lm_head.weight"]
        needed = {mapping.hf_source(arch, n)[0] for n in names}
        missing = sorted(needed - set(md))
        if missing:
            raise CptError(f"{ckpt}: missing model tensors {missing} (is this a model checkpoint for this config?)")
        if dtype is not None and dtype not in DTYPES:
            raise CptError(f"--dtype must be bf16 or fp32, got {dtype!r}")
        out_dt = DTYPES[dtype] if dtype else md[mapping.EMBED_KEY].dtype
        emb_rows = md[mapping.EMBED_KEY].global_shape[0]
        if emb_rows < arch.vocab_size:
            raise CptError(f"{ckpt}: embedding has {emb_rows} rows but the tokenizer/config needs {arch.vocab_size}")
        shapes = mapping.hf_shapes(arch)
        el = torch.empty((), dtype=out_dt).element_size()
        shards, cur, cur_bytes = [], [], 0
        for n in names:
            b = int(torch.Size(shapes[n]).numel()) * el
            if cur and cur_bytes + b > limit:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append((n, shapes[n], out_dt))
            cur_bytes += b
        shards.append(cur)
        cache: dict = {}

        def produce(name: str) -> torch.Tensor:
            key, layer = mapping.hf_source(arch, name)
            if cache.get("id") != (key, layer):
                cache.clear()
                cache["t"] = read_ckpt_tensor(ckpt, key, md[key], layer)
                cache["id"] = (key, layer)
            return mapping.to_hf(arch, name, cache["t"]).to(out_dt).contiguous()

        total = sum(int(torch.Size(shapes[n]).numel()) * el for n in names)
        _check_space(out, total)
        weight_map = {}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for i, entries in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors_streaming(tmp / fname, entries, produce)
                weight_map.update({n: fname for n, _, _ in entries})
            cache.clear()
            write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                              "weight_map": weight_map})
            cfg = _hf_config(meta, arch, out_dt)
            write_json(tmp / "config.json", cfg)
            write_json(tmp / "generation_config.json", _generation_config(cfg))
            tok_dir = tokenizer_path(ckpt, meta)
            tok_files = sorted(p for p in tok_dir.iterdir() if p.is_file()) if tok_dir and tok_dir.is_dir() else \
                ([tok_dir] if tok_dir else [])
            for f in tok_files:
                shutil.copy2(f, tmp / f.name)
            (tmp / "README.md").write_text(model_card(meta, arch, dtype_name(out_dt)))
            summary = {"out": str(out), "shards": len(shards), "bytes": total, "dtype": dtype_name(out_dt),
                       "vocab_size": arch.vocab_size, "tokenizer_files": [f.name for f in tok_files],
                       "seconds_convert": round(time.time() - t0, 2)}
            if verify:
                from cpt_megatron.checkpoint.verify import check_parity, verify_checkpoint

                res = verify_checkpoint(tmp, ckpt)
                summary["verify"] = res
                check_parity(res, arch, tol=verify_tol, what="export")
    return summary
