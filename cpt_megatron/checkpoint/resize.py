"""`cpt resize-embeddings`: grow a checkpoint's word embeddings (and untied output layer) for an extended tokenizer.

New rows are never random: `subtoken-mean` (default) sets each new token's row to the mean of the rows of
the base tokens the BASE tokenizer splits it into; `mean` uses the mean of all real base rows. Old rows
are copied bit-exactly, padding follows the one padding rule, and `cpt_meta.json` records the new
tokenizer (copied into the checkpoint) so `cpt export-hf` writes it, and the added row range
(`tokenizer_extension.new_rows`) that `train.stages`' `new_vocab_rows` trains. Streaming like import: one tensor
at a time. Only model tensors are carried over (a training checkpoint's optimizer state is not).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from cpt_megatron.checkpoint import mapping
from cpt_megatron.checkpoint.io import (
    TOKENIZER_DIR,
    arch_from_ckpt,
    ckpt_tensor_keys,
    open_checkpoint,
    read_ckpt_tensor,
    read_meta,
    single_process_group,
    write_release,
)
from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import padded_vocab_size

__all__ = ["resize_embeddings", "grow_rows", "INITS"]

INITS = ("subtoken-mean", "mean")


def _subtoken_map(base_tok, new_tok) -> dict[int, list[int]]:
    try:  # the tokenizer package's definition (same model alphabet -> exact BPE segmentation of the piece)
        from cpt_megatron.tokenizer.extend import subtoken_map
    except ImportError:  # pragma: no cover - fallback when the tokenizer module lacks it
        base_vocab = base_tok.get_vocab()
        return {i: base_tok.encode(new_tok.decode([i]), add_special_tokens=False)
                for t, i in new_tok.get_vocab().items() if base_vocab.get(t) != i}
    return subtoken_map(base_tok, new_tok)


def grow_rows(old: torch.Tensor, true_rows: int, new_rows: int, padded: int, new_ids: dict[int, list[int]],
              init: str) -> torch.Tensor:
    """[padded, H] from `old` (its first `true_rows` rows are real): old rows kept, new ids initialized."""
    real = old[:true_rows].float()
    mean = real.mean(0)
    out = torch.zeros((padded, old.shape[1]), dtype=torch.float32)
    out[:true_rows] = real
    for nid, sub in new_ids.items():
        if not 0 <= nid < new_rows:
            raise CptError(f"new token id {nid} outside the new vocab [0, {new_rows})")
        sub = [s for s in sub if s < true_rows]
        out[nid] = real[sub].mean(0) if init == "subtoken-mean" and sub else mean
    out = out.to(old.dtype)
    out[:true_rows] = old[:true_rows]  # bit-exact copy of the old rows
    return out


def resize_embeddings(ckpt: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike, *,
                      init: str = "subtoken-mean", overwrite: bool = False) -> dict:
    from cpt_megatron.tokenizer.load import load_tokenizer, tokenizer_files

    t0 = time.time()
    if init not in INITS:
        raise CptError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    ckpt, out = open_checkpoint(ckpt), Path(out)  # any layout; manifest checked before any work
    if out.exists() and not overwrite:
        raise CptError(f"output {out} already exists; pass --overwrite to replace it")
    meta = read_meta(ckpt)
    arch = arch_from_ckpt(ckpt)
    base_dir = ckpt / (meta.get("tokenizer") or TOKENIZER_DIR)
    if not base_dir.is_dir():
        raise CptError(f"{ckpt}: no tokenizer/ inside the checkpoint; the base tokenizer is needed for subtoken init")
    base_tok, new_tok = load_tokenizer(base_dir, cache=False), load_tokenizer(tokenizer, cache=False)
    new_ids = _subtoken_map(base_tok, new_tok)
    if not new_ids:
        raise CptError(f"{tokenizer} adds no tokens to the checkpoint's tokenizer; nothing to resize")
    new_rows = max(arch.vocab_size, len(new_tok))
    div = int(meta.get("make_vocab_size_divisible_by", 128))
    padded = padded_vocab_size(new_rows, 1, div)
    new_cfg = dict(meta["hf_config"], vocab_size=new_rows)
    new_arch = type(arch).from_hf_config(new_cfg)
    with single_process_group():
        md = ckpt_tensor_keys(ckpt)

        def tensors():
            for spec in mapping.megatron_specs(new_arch, padded):
                if spec.key not in md:
                    raise CptError(f"{ckpt}: missing model tensor {spec.key}")
                t = read_ckpt_tensor(ckpt, spec.key, md[spec.key], spec.layer)
                if spec.key in (mapping.EMBED_KEY, mapping.OUTPUT_KEY):
                    t = grow_rows(t, arch.vocab_size, new_rows, padded, new_ids, init)
                yield spec, t

        new_meta = dict(meta, hf_config=new_cfg, vocab_size=new_rows, padded_vocab_size=padded,
                        tokenizer=TOKENIZER_DIR, created_by="cpt resize-embeddings", parent=str(ckpt.resolve()))
        new_meta.pop("training", None)
        new_meta.pop("eval", None)
        new_meta["tokenizer_extension"] = {
            "base_vocab_size": arch.vocab_size, "vocab_size": new_rows, "new_tokens": len(new_ids),
            "init": init, "tokenizer_source": str(Path(tokenizer).resolve()),
            "empty_subtoken_splits": sum(1 for v in new_ids.values() if not v),
            # [start, end) of the added rows (input and output embeddings): train.stages' new_vocab_rows
            "new_rows": [min(new_ids), max(new_ids) + 1],
        }
        files = {(f.name if Path(tokenizer).is_dir() else "tokenizer.json"): f
                 for f in tokenizer_files(tokenizer) if f.name != "config.json"}
        nbytes = write_release(out, tensors(), arch.num_layers, new_meta, tokenizer_files=files, overwrite=overwrite)
    return {"out": str(out), "old_vocab": arch.vocab_size, "new_vocab": new_rows, "padded_vocab_size": padded,
            "new_tokens": len(new_ids), "init": init, "tied": arch.tie_word_embeddings, "bytes": nbytes,
            "seconds": round(time.time() - t0, 2)}
