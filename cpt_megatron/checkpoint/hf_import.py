"""`cpt import-hf`: an HF Llama-family checkpoint (or a GGUF) -> megatron-core torch_dist checkpoint.

Streaming: one HF tensor group is converted at a time, staged to disk and memory-mapped, so peak RSS
is about the largest converted tensor (plus its sources) whatever the model size. Output is written
to a temp dir beside `out`, verified against transformers (unless `verify=False`), then renamed.
Layout (checkpoint.layout): OUT/latest_checkpointed_iteration.txt ("release") + OUT/release/, so
Megatron-LM's `pretrain_gpt.py --load OUT --finetune` loads it (flags in OUT/release/megatron_args.txt).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from cpt_megatron.checkpoint import mapping
from cpt_megatron.checkpoint.io import (
    DTYPES,
    TOKENIZER_DIR,
    HFReader,
    check_safetensors_file,
    dtype_name,
    write_release,
)
from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import ModelArch, padded_vocab_size
from cpt_megatron.utils import check_gguf, sha256_file

__all__ = ["import_hf", "gguf_to_hf", "check_hf_checkpoint"]

log = logging.getLogger(__name__)
_IGNORED = ("rotary_emb.inv_freq",)


def gguf_to_hf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF into an fp32 HF checkpoint + tokenizer with transformers (gguf + accelerate needed)."""
    g = check_gguf(gguf_file, "--gguf")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cpt_megatron.utils import hf_quiet

        with hf_quiet(gguf=True):
            model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype="float32")
            tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    except ImportError as e:
        raise CptError(f"reading GGUF needs the `gguf` and `accelerate` packages: {e}") from e
    out = Path(out_dir)
    # transformers 5 flags GGUF-loaded models as quantized and refuses save_pretrained, although the weights
    # are already dequantized fp32: write them (and a config without quantization_config) ourselves.
    from safetensors.torch import save_file

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tok.save_pretrained(str(out))
    return out


def check_hf_checkpoint(hf_dir: str | os.PathLike) -> tuple[ModelArch, HFReader]:
    """Validate config + weights (architecture, every tensor present with the config's shape)."""
    from cpt_megatron.model.arch import load_hf_config

    arch = load_hf_config(hf_dir)
    reader = HFReader(hf_dir)
    for shard in reader.shards:
        if shard.endswith(".safetensors"):
            check_safetensors_file(reader.dir / shard)
    expected = mapping.hf_shapes(arch)
    names = set(reader.names())
    missing = [n for n in expected if n not in names]
    if missing:
        raise CptError(f"{hf_dir}: {len(missing)} tensor(s) required by config.json are missing, e.g. {missing[:3]}")
    extra = [n for n in names if n not in expected and not n.endswith(_IGNORED)
             and not (n == "lm_head.weight" and arch.tie_word_embeddings)]
    if extra:
        raise CptError(f"{hf_dir}: unexpected tensors for a {arch.model_type} model: {sorted(extra)[:5]} "
                       "(unsupported architecture variant?)")
    for n, shp in expected.items():
        got = reader.shape(n)
        if got != shp:
            raise CptError(f"{hf_dir}: tensor {n} has shape {list(got)} but config.json implies {list(shp)}")
    return arch, reader


def _tokenizer_check(src: Path, arch: ModelArch) -> list[Path]:
    from cpt_megatron.tokenizer.load import load_tokenizer, tokenizer_files

    files = [f for f in tokenizer_files(src) if f.name != "config.json"]
    if not files:
        log.warning("%s has no tokenizer files; the checkpoint will carry none", src)
        return []
    n = len(load_tokenizer(src, cache=False))
    if n > arch.vocab_size:
        raise CptError(f"{src}: tokenizer has {n} tokens but the model has only {arch.vocab_size} embedding rows; "
                       "resize the model with `cpt resize-embeddings` instead")
    return files


def import_hf(hf_dir: str | os.PathLike | None, out: str | os.PathLike, *, gguf: str | os.PathLike | None = None,
              dtype: str = "auto", overwrite: bool = False, verify: bool = True, verify_tol: float | None = None,
              make_vocab_size_divisible_by: int = 128) -> dict:
    """Convert and write `out`; returns a summary (and the verify result unless verify=False)."""
    if (hf_dir is None) == (gguf is None):
        raise CptError("give exactly one of --hf DIR or --gguf FILE")
    if dtype != "auto" and dtype not in DTYPES:
        raise CptError(f"--dtype must be auto, bf16 or fp32, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CptError(f"output {out} already exists; pass --overwrite to replace it")
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        source = {"path": str(Path(hf_dir or gguf).resolve())}
        if gguf is not None:
            tmp_hf = stack.enter_context(tempfile.TemporaryDirectory(prefix="cpt-gguf-"))
            hf_dir = gguf_to_hf(gguf, tmp_hf)
            source.update(kind="gguf", sha256=sha256_file(gguf))
        else:
            source["kind"] = "hf"
        hf_dir = Path(hf_dir)
        arch, reader = check_hf_checkpoint(hf_dir)
        tok_files = _tokenizer_check(hf_dir, arch)
        cfg = json.loads((hf_dir / "config.json").read_text())
        padded = padded_vocab_size(arch.vocab_size, 1, make_vocab_size_divisible_by)
        target = None if dtype == "auto" else DTYPES[dtype]
        src_dtype = reader.dtype()
        out_dtype = target or src_dtype

        def tensors():
            for spec in mapping.megatron_specs(arch, padded):
                t = mapping.to_megatron(arch, spec, reader.get, padded)
                yield spec, t.to(out_dtype)

        meta = {
            "format": "cpt-megatron/1",
            "created_by": "cpt import-hf",
            "source": source,
            "hf_config": cfg,
            "vocab_size": arch.vocab_size,
            "padded_vocab_size": padded,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "dtype": dtype_name(out_dtype),
            "tokenizer": TOKENIZER_DIR if tok_files else None,
            "source_shards": {s: sha256_file(hf_dir / s) for s in reader.shards},
        }
        summary = {"out": str(out), "model_type": arch.model_type, "num_layers": arch.num_layers,
                   "vocab_size": arch.vocab_size, "padded_vocab_size": padded, "dtype": meta["dtype"]}

        def parity(folder: Path) -> None:  # before the manifest and tracker: a failed check leaves no OUT
            from cpt_megatron.checkpoint.verify import check_parity, verify_checkpoint

            reader.close()  # the source shards' maps, before transformers loads the model again
            summary["seconds_convert"] = round(time.time() - t0, 2)
            summary["verify"] = res = verify_checkpoint(hf_dir, folder)
            check_parity(res, arch, tol=verify_tol, what="import")

        try:
            # Megatron-LM's layout: OUT/latest_checkpointed_iteration.txt = "release", tensors in OUT/release/
            summary["bytes"] = write_release(out, tensors(), arch.num_layers, meta, overwrite=overwrite,
                                             tokenizer_files={f.name: f for f in tok_files},
                                             check=parity if verify else None)
        finally:
            reader.close()
        summary.setdefault("seconds_convert", round(time.time() - t0, 2))
    return summary
