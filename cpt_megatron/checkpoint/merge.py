"""`cpt merge`: weight interpolation of checkpoints of one model, streamed one tensor at a time.

    base <-> CPT (WiSE-FT, Wortsman et al. 2022):   w = (1 - λ)·w_base + λ·w_ckpt      λ in [0, 1]
    average of a run's checkpoints (model soup):    w = Σ_i (1/N)·w_i                  N >= 2

Every model tensor is read as its GLOBAL tensor (one layer's slice at a time, `io.read_ckpt_tensor`), so
the inputs may come from any TP/PP/VPP/DP layout, from `cpt import-hf`, `cpt train` (model keys only:
optimizer state and RNG are never read), `cpt resize-embeddings`, `cpt merge` or Megatron-LM's torch_dist
saves, and may differ from each other in layout, vocabulary padding rows and dtype. Refused with one line:
different architectures, vocabularies or tokenizers, missing model tensors, a weight outside [0, 1],
non-torch_dist checkpoints (no metadata.json).

Arithmetic: each term is `w_i.float() * c_i` in fp32 (c_i the Python-float coefficient, rounded to fp32 by the
kernel), summed left to right (base first), then cast to the output dtype: the widest stored dtype of the
inputs (fp32 when any input is fp32) unless `dtype` is given. A term whose coefficient is exactly 0 is
skipped, so λ=0 reproduces the base and λ=1 the checkpoint bit for bit (same dtype). Embedding/output
padding rows (above the true vocabulary, never scored) are merged where every input has them, else taken
from the first input; the output keeps the first input's padded row count.

Memory: at most one input tensor, the fp32 accumulator and the cast output are alive at a time (the
writer stages each merged tensor to disk and memory-maps it, `io.write_torch_dist`), so peak anonymous
memory is a few times the largest tensor (the embedding), not the model (tests/test_merge.py measures it).

Output: a model-only "release" checkpoint (Megatron-LM layout, `layout.py`) with cpt_meta.json (the first
input's, plus a `merge` section naming every input and coefficient), tokenizer/, megatron_args.txt and
cpt_manifest.json, written atomically: `cpt train` (model.base), `cpt eval`, `cpt verify`, `cpt export-hf` and
Megatron-LM's `--load ... --finetune` read it like an imported base.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cpt_megatron.checkpoint import mapping
from cpt_megatron.checkpoint.io import (
    DTYPES,
    TOKENIZER_DIR,
    arch_from_ckpt,
    ckpt_tensor_keys,
    dtype_name,
    open_checkpoint,
    read_ckpt_tensor,
    read_meta,
    single_process_group,
    tokenizer_path,
    write_release,
)
from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import ModelArch

__all__ = ["merge_checkpoints", "merge_coefficients", "combine", "check_weight"]

_VOCAB_KEYS = (mapping.EMBED_KEY, mapping.OUTPUT_KEY)
_NOT_SHAPE = ("torch_dtype",)  # inputs may be stored in different dtypes (the output dtype is chosen below)


@dataclasses.dataclass
class _Input:
    path: Path  # the iteration folder (layout.resolve)
    given: str  # what the user typed, for messages
    coef: float
    meta: dict
    arch: ModelArch
    tensors: dict  # key -> ShardedTensor metadata (global shape, dtype)


def check_weight(weight: float, what: str = "--weight") -> float:
    """λ must be a finite number in [0, 1] (interpolation, not extrapolation)."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise CptError(f"{what} {weight!r}: not a number; give λ in [0, 1] (0 = the base, 1 = the checkpoint)") from None
    if not 0.0 <= w <= 1.0:
        raise CptError(f"{what} {weight}: must be in [0, 1] (0 = the base, 1 = the checkpoint); "
                       "extrapolation is not supported")
    return w


def merge_coefficients(n_ckpts: int, *, base: bool, weight: float | None) -> list[float]:
    """The coefficient of each input (base first when given)."""
    if base:
        if n_ckpts != 1:
            raise CptError(f"--base takes exactly one --ckpt to interpolate with (got {n_ckpts}); to average several "
                           "checkpoints of a run, drop --base")
        if weight is None:
            raise CptError("--base needs --weight λ in [0, 1]: w = (1-λ)·base + λ·ckpt")
        lam = check_weight(weight)
        return [1.0 - lam, lam]
    if weight is not None:
        raise CptError("--weight applies to --base B --ckpt C (interpolation); without --base the checkpoints are "
                       "averaged with equal weights")
    if n_ckpts < 2:
        raise CptError(f"averaging needs at least two --ckpt (got {n_ckpts}); to interpolate with a base model give "
                       "--base B --ckpt C --weight λ")
    return [1.0 / n_ckpts] * n_ckpts


def combine(acc: torch.Tensor | None, t: torch.Tensor, coef: float) -> torch.Tensor | None:
    """acc + coef·t in fp32 (a term with coefficient 0 is skipped; acc None = first term)."""
    if coef == 0.0:
        return acc
    term = t.float() * coef
    return term if acc is None else acc.add_(term)


def _open(given, coef: float, tokenizer=None) -> _Input:
    path = open_checkpoint(given)  # any layout; manifest (sizes + checksums) verified before any work
    meta = read_meta(path, tokenizer)  # `tokenizer`: for Megatron-LM saves whose tokenizer_model is elsewhere
    return _Input(path=path, given=str(given), coef=coef, meta=meta, arch=arch_from_ckpt(path, tokenizer),
                  tensors=ckpt_tensor_keys(path))


def _check_same_model(inputs: list[_Input]) -> None:
    a = inputs[0]
    for b in inputs[1:]:
        if a.arch.vocab_size != b.arch.vocab_size:
            raise CptError(f"{b.given}: vocabulary of {b.arch.vocab_size} tokens but {a.given} has {a.arch.vocab_size}; "
                           "merge checkpoints that share one tokenizer (resize the base first with "
                           "`cpt resize-embeddings`)")
        diff = [f.name for f in dataclasses.fields(ModelArch) if f.compare and f.name not in _NOT_SHAPE
                and getattr(a.arch, f.name) != getattr(b.arch, f.name)]
        if diff:
            f = diff[0]
            raise CptError(f"{b.given}: a different architecture from {a.given} ({f} {getattr(b.arch, f)!r} vs "
                           f"{getattr(a.arch, f)!r}); merge only checkpoints of one model")
        _check_same_tokenizer(a, b)


def _check_same_tokenizer(a: _Input, b: _Input) -> None:
    ta, tb = tokenizer_path(a.path, a.meta), tokenizer_path(b.path, b.meta)
    if ta is None or tb is None:
        return  # a checkpoint without a tokenizer: the vocabulary size check above is all we can do
    fa = ta / "tokenizer.json" if ta.is_dir() else ta
    fb = tb / "tokenizer.json" if tb.is_dir() else tb
    if fa.is_file() and fb.is_file() and fa.read_bytes() == fb.read_bytes():
        return
    from cpt_megatron.tokenizer.load import load_tokenizer

    if load_tokenizer(ta, cache=False).get_vocab() != load_tokenizer(tb, cache=False).get_vocab():
        raise CptError(f"{b.given}: its tokenizer ({tb}) maps tokens to other ids than {a.given}'s ({ta}); "
                       "merge only checkpoints trained with one tokenizer")


def _plan(inputs: list[_Input]) -> tuple[list[mapping.TensorSpec], int, torch.dtype]:
    """(the model tensors to write, output padded vocab rows, the widest stored dtype); shapes checked."""
    a = inputs[0]
    if mapping.EMBED_KEY not in a.tensors:
        raise CptError(f"{a.given}: no {mapping.EMBED_KEY} (not a model checkpoint of a Llama-family decoder?)")
    rows = int(a.tensors[mapping.EMBED_KEY].global_shape[0])
    specs = mapping.megatron_specs(a.arch, rows)
    keys = list(dict.fromkeys(s.key for s in specs))
    widest = None
    for x in inputs:
        missing = [k for k in keys if k not in x.tensors]
        if missing:
            raise CptError(f"{x.given}: missing model tensor(s) {missing[:3]}; is it a model checkpoint of this "
                           "architecture?")
        for k in keys:
            shp, shp0 = tuple(x.tensors[k].global_shape), tuple(a.tensors[k].global_shape)
            if k in _VOCAB_KEYS:
                ok = shp[1:] == shp0[1:] and shp[0] >= x.arch.vocab_size
            else:
                ok = shp == shp0
            if not ok:
                raise CptError(f"{x.given}: tensor {k} has shape {list(shp)} but {a.given} has {list(shp0)}; "
                               "merge only checkpoints of one model")
            dt = x.tensors[k].dtype
            if dt not in (torch.float32, torch.bfloat16, torch.float16):
                raise CptError(f"{x.given}: tensor {k} is {dt}; merge reads fp32/bf16/fp16 weights")
            widest = dt if widest is None or widest == dt else torch.float32
    return specs, rows, widest


def _merged(inputs: list[_Input], spec: mapping.TensorSpec, rows: int, out_dt: torch.dtype) -> torch.Tensor:
    """One merged global tensor (one layer's slice), streamed: one input tensor alive at a time."""
    acc, pad = None, None
    vocab = spec.key in _VOCAB_KEYS
    n = min(int(x.tensors[spec.key].global_shape[0]) for x in inputs) if vocab else None
    for x in inputs:
        t = read_ckpt_tensor(x.path, spec.key, x.tensors[spec.key], spec.layer)
        if vocab:
            if x is inputs[0] and n < rows:
                pad = t[n:rows].clone()  # padding rows not every input has: the first input's
            t = t[:n]
        acc = combine(acc, t, x.coef)
        del t
    out = acc.to(out_dt)
    del acc
    if pad is not None:
        out = torch.cat([out, pad.to(out_dt)])
    _trim_heap()
    return out


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it after the mixed-size allocations of reading
    tensors: without this, anonymous RSS creeps up with every tensor merged); a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def merge_checkpoints(ckpts: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                      base: str | os.PathLike | None = None, weight: float | None = None, dtype: str | None = None,
                      overwrite: bool = False, tokenizer: str | os.PathLike | None = None) -> dict:
    """Write `out` = (1-λ)·base + λ·ckpts[0] (with `base`), else the equal-weight average of `ckpts`.
    `tokenizer` stands in for checkpoints that carry none (Megatron-LM saves), as in `cpt export-hf`."""
    t0 = time.time()
    coefs = merge_coefficients(len(ckpts), base=base is not None, weight=weight)
    if dtype is not None and dtype not in DTYPES:
        raise CptError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CptError(f"output {out} already exists; pass --overwrite to replace it")
    paths = ([base] if base is not None else []) + list(ckpts)
    with single_process_group():
        inputs = [_open(p, c, tokenizer) for p, c in zip(paths, coefs)]
        resolved = [x.path.resolve() for x in inputs]
        if out.resolve() in resolved or any(out.resolve() in r.parents for r in resolved):
            raise CptError(f"--out {out} is one of the inputs; write the merge to a new folder")
        _check_same_model(inputs)
        specs, rows, widest = _plan(inputs)
        out_dt = DTYPES[dtype] if dtype else widest
        first = inputs[0]
        tok_src = tokenizer_path(first.path, first.meta)
        formula = " + ".join(f"{x.coef:g}·{x.given}" for x in inputs)
        section = {"method": "linear" if base is not None else "average",
                   "weight": coefs[-1] if base is not None else None,
                   "formula": f"w = {formula}", "arithmetic": "fp32, terms summed in this order",
                   "inputs": [{"path": str(x.path.resolve()), "coefficient": x.coef,
                               "iteration": x.meta.get("iteration"), "training": x.meta.get("training")}
                              for x in inputs]}
        meta = {k: v for k, v in first.meta.items() if k not in ("training", "eval", "merge")}
        meta.update(format="cpt-megatron/1", created_by="cpt merge", dtype=dtype_name(out_dt),
                    padded_vocab_size=rows, tokenizer=TOKENIZER_DIR if tok_src else None, merge=section,
                    training={"merge": section["formula"]})
        if tok_src is None:
            files = {}
        elif tok_src.is_dir():
            files = {str(f.relative_to(tok_src)): f for f in sorted(tok_src.rglob("*")) if f.is_file()}
        else:
            files = {"tokenizer.json": tok_src}
        tensors = ((s, _merged(inputs, s, rows, out_dt)) for s in specs)
        nbytes = write_release(out, tensors, first.arch.num_layers, meta, tokenizer_files=files, overwrite=overwrite)
    return {"out": str(out), "method": section["method"], "formula": section["formula"],
            "inputs": [str(x.path) for x in inputs], "coefficients": coefs, "dtype": dtype_name(out_dt),
            "tensors": len(specs), "bytes": nbytes, "seconds": round(time.time() - t0, 2)}
