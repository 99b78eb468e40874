"""Checkpoint I/O: HF shard reading (validated, lazy), cpt_meta.json, and torch_dist read/write helpers.

Everything here touches one tensor at a time: the HF reader memory-maps shards, the torch_dist
writer is handed memory-mapped staged tensors, and the reader loads one (key, layer) slice per call.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import ModelArch
from cpt_megatron.runtime.distributed import single_process_group  # re-exported: the checkpoint tools use it

__all__ = [
    "META_NAME", "TOKENIZER_DIR", "read_meta", "arch_from_ckpt", "HFReader", "load_model_weights", "ckpt_tensor_keys",
    "read_ckpt_tensor", "write_torch_dist", "single_process_group", "DTYPES", "open_checkpoint", "tokenizer_path",
    "megatron_lm_meta", "file_checksum", "sampled_checksum", "write_release",
]

META_NAME = "cpt_meta.json"
TOKENIZER_DIR = "tokenizer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]


_MLM_META: dict[str, dict] = {}


# -- cpt_meta.json ---------------------------------------------------------------------------------------
def read_meta(ckpt_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> dict:
    """The checkpoint's `cpt_meta.json`; for a checkpoint saved by Megatron-LM, the same fields derived from
    common.pt['args'] and the tokenizer (`tokenizer`, else args.tokenizer_model). Any layout (see layout.resolve)."""
    from cpt_megatron.checkpoint import layout

    folder = layout.resolve(ckpt_dir)
    f = folder / META_NAME
    if not f.is_file():
        key = str(folder.resolve())
        if tokenizer is not None or key not in _MLM_META:  # later calls without --tokenizer reuse the first
            _MLM_META[key] = megatron_lm_meta(folder, tokenizer)
        return copy.deepcopy(_MLM_META[key])
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CptError(f"{f}: invalid JSON ({e.msg} at line {e.lineno})") from e
    if tokenizer is not None:
        meta["tokenizer"] = str(Path(tokenizer).resolve())
    return meta


def tokenizer_path(ckpt_dir: str | os.PathLike, meta: dict) -> Path | None:
    """Where the checkpoint's tokenizer lives (inside it, or an absolute path for Megatron-LM saves)."""
    from cpt_megatron.checkpoint import layout

    p = layout.resolve(ckpt_dir) / (meta.get("tokenizer") or TOKENIZER_DIR)
    return p if p.exists() else None


def megatron_lm_meta(folder: Path, tokenizer: str | os.PathLike | None = None) -> dict:
    """cpt_meta.json fields for a checkpoint Megatron-LM saved (no cpt_meta.json): shape from common.pt['args']."""
    from cpt_megatron.checkpoint import layout
    from cpt_megatron.checkpoint.megatron_lm import hf_config_from_args

    common = layout.load_common(folder)
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise CptError(f"{folder}: no {META_NAME} and no Megatron-LM args in common.pt; is this a checkpoint written "
                       "by `cpt import-hf`, `cpt train` or Megatron-LM's pretrain_gpt.py?")
    tok = tokenizer or getattr(args, "tokenizer_model", None)
    if not tok or not Path(tok).exists():
        raise CptError(f"{folder}: a Megatron-LM checkpoint; its tokenizer "
                       f"{'(args.tokenizer_model=' + repr(tok) + ') is not on this machine' if tok else 'is not recorded'}"
                       "; pass --tokenizer DIR (the HF tokenizer it was trained with)")
    from cpt_megatron.tokenizer.load import load_tokenizer

    t = load_tokenizer(str(tok), cache=False)
    true_vocab = len(t)
    padded = getattr(args, "padded_vocab_size", None)
    if padded is not None and true_vocab > padded:
        raise CptError(f"{tok}: tokenizer has {true_vocab} tokens but the checkpoint only {padded} embedding rows; "
                       "wrong --tokenizer?")
    cfg = hf_config_from_args(args, true_vocab, source=str(folder / "common.pt"), bos=t.bos_token_id,
                              eos=t.eos_token_id)
    return {
        "format": "megatron-lm", "created_by": "Megatron-LM pretrain_gpt.py", "source": {"kind": "megatron-lm",
                                                                                       "path": str(folder)},
        "hf_config": cfg, "vocab_size": true_vocab, "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": getattr(args, "make_vocab_size_divisible_by", 128), "dtype": cfg["torch_dtype"],
        "tokenizer": str(Path(tok).resolve()), "iteration": common.get("iteration"),
        "training": {"framework": "Megatron-LM", "iteration": common.get("iteration"),
                     "consumed_train_samples": getattr(args, "consumed_train_samples", None)},
    }


def arch_from_ckpt(ckpt_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ModelArch:
    """ModelArch of a checkpoint; `vocab_size` is the TRUE vocab (tokenizer rows, an extended one included)."""
    meta = read_meta(ckpt_dir, tokenizer)
    cfg = dict(meta["hf_config"])
    cfg["vocab_size"] = int(meta.get("vocab_size", cfg["vocab_size"]))
    return ModelArch.from_hf_config(cfg, source=str(Path(ckpt_dir) / META_NAME))


# -- HF checkpoints --------------------------------------------------------------------------------------
class HFReader:
    """Lazy, validated access to the tensors of an HF checkpoint directory.

    Accepts `model.safetensors.index.json` + shards, a single `model.safetensors`, or `pytorch_model*.bin`
    (with or without index). Missing/corrupt shards and index entries naming absent files are CptErrors.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CptError(f"HF checkpoint directory not found: {self.dir}")
        self.weight_map: dict[str, str] = {}
        self._open: dict[str, object] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            idx = self.dir / index_name
            if idx.is_file():
                try:
                    self.weight_map = dict(json.loads(idx.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise CptError(f"{idx}: not a valid index (expected a 'weight_map' object): {e}") from e
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if (self.dir / single).is_file():
                    self.weight_map = {n: single for n in self._names_in(single)}
                    break
            else:
                raise CptError(
                    f"{self.dir}: no weights found (expected model.safetensors[.index.json] or pytorch_model*.bin)"
                )
        self.shards = sorted(set(self.weight_map.values()))
        missing = [s for s in self.shards if not (self.dir / s).is_file()]
        if missing:
            raise CptError(f"{self.dir}: the index names shard file(s) that do not exist: {', '.join(missing)}")

    def _names_in(self, shard: str) -> list[str]:
        if shard.endswith(".safetensors"):
            return list(self._safe(shard).keys())
        return list(self._bin(shard).keys())

    def _safe(self, shard: str):
        from safetensors import safe_open

        if shard not in self._open:
            try:
                self._open[shard] = safe_open(str(self.dir / shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CptError(f"{self.dir / shard}: corrupt or truncated safetensors shard ({e})") from e
        return self._open[shard]

    def _bin(self, shard: str):
        if shard not in self._open:
            try:
                self._open[shard] = torch.load(self.dir / shard, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CptError(f"{self.dir / shard}: corrupt or unreadable PyTorch shard ({e})") from e
        return self._open[shard]

    def names(self) -> list[str]:
        return list(self.weight_map)

    _ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}

    def _mapped(self, shard: str, name: str) -> torch.Tensor | None:
        """A zero-copy tensor over the memory-mapped shard (file pages, not anonymous memory); None if unusual."""
        import warnings

        import numpy as np

        key = ("mm", shard)
        if key not in self._open:
            path = self.dir / shard
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            self._open[key] = (header, 8 + n, np.memmap(path, mode="r") if path.stat().st_size else None)
        header, start, mm = self._open[key]
        info = header.get(name)
        dt = self._ST_DTYPES.get(info["dtype"]) if info else None
        if dt is None or mm is None:
            return None
        b, e = info["data_offsets"]
        count = (e - b) // torch.empty((), dtype=dt).element_size()
        if count == 0:
            return torch.empty(info["shape"], dtype=dt)
        with warnings.catch_warnings():  # read-only mapping: converters never write into source tensors
            warnings.simplefilter("ignore")
            return torch.frombuffer(mm, dtype=dt, count=count, offset=start + b).view(info["shape"])

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CptError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        try:
            if shard.endswith(".safetensors"):
                t = self._mapped(shard, name)
                return t if t is not None else self._safe(shard).get_tensor(name)
            return self._bin(shard)[name]
        except CptError:
            raise
        except Exception as e:
            raise CptError(f"{self.dir / shard}: cannot read tensor {name!r} (corrupt shard?): {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self.weight_map[name]
        if shard.endswith(".safetensors"):
            return tuple(self._safe(shard).get_slice(name).get_shape())
        return tuple(self._bin(shard)[name].shape)

    def dtype(self) -> torch.dtype:
        return self.get(self.names()[0]).dtype

    def close(self) -> None:
        self._open.clear()


def check_safetensors_file(path: Path) -> None:
    """Cheap integrity check: header parses and the data section has the length the header implies."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CptError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CptError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CptError(f"{path}: corrupt safetensors header ({e.msg})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CptError(f"{path}: truncated or corrupt safetensors shard (expected {8 + n + end} bytes, found {size})")


def write_torch_dist(out_dir: Path, tensors, num_layers: int, staging: Path, extra_state: list[str],
                     common: dict | None = None) -> int:
    """Write (spec, tensor) pairs as a megatron-core torch_dist checkpoint at `out_dir`; returns bytes staged.

    `common` (checkpoint_version, iteration, args: see checkpoint.megatron_lm) lands in common.pt.

    Each converted tensor is streamed to `staging` and re-opened memory-mapped, so the state dict handed to
    `dist_checkpointing.save` holds no tensor data in anonymous memory (only pages being written are resident).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    staging.mkdir(parents=True, exist_ok=True)
    sharded, nbytes = {}, 0
    for n, (spec, t) in enumerate(tensors):
        f = staging / f"{n:06d}.pt"
        torch.save(t.contiguous().clone() if t.storage_offset() or not t.is_contiguous() else t, f)
        nbytes += t.numel() * t.element_size()
        del t
        mm = torch.load(f, mmap=True, weights_only=True)
        if spec.layer is None:
            st = ShardedTensor.from_rank_offsets(spec.key, mm, replica_id=0)
            sharded[spec.key] = st
        else:
            st = ShardedTensor.from_rank_offsets(spec.key, mm, (0, spec.layer, num_layers), replica_id=0,
                                                 prepend_axis_num=1)
            sharded[f"{spec.key}.{spec.layer}"] = st
    for key in extra_state:
        for i in range(num_layers):
            sharded[f"{key}.{i}"] = ShardedObject(key, None, (num_layers,), (i,), replica_id=0)
    sharded.update(common or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    # one writer process, not megatron's default two: each forked writer's RSS re-counts the parent's
    # (copy-on-write) anonymous pages, and a converter has nothing to overlap
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    dist_checkpointing.save(sharded, str(out_dir), TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1))
    del sharded
    return nbytes


def write_release(out: str | os.PathLike, tensors, num_layers: int, meta: dict, *,
                  tokenizer_files: dict[str, Path] | None = None, overwrite: bool = False, check=None) -> int:
    """Write `out` as a model-only Megatron-LM release checkpoint (what `cpt import-hf`, `cpt resize-embeddings`
    and `cpt merge` produce); returns the tensor bytes written.

    OUT/release/ holds the torch_dist tensors from (spec, tensor) pairs (streamed, see write_torch_dist) with
    Megatron-LM's common entries (iteration 0), `tokenizer_files` (path inside tokenizer/ -> source file),
    cpt_meta.json = `meta`, megatron_args.txt; then `check(release_folder)` (e.g. the import's parity check) may
    raise; then the manifest, and OUT/latest_checkpointed_iteration.txt = "release". All of it is written in a
    temp folder beside OUT that replaces OUT only when complete (utils.atomic_dir)."""
    from cpt_megatron.checkpoint import layout, mapping, megatron_lm
    from cpt_megatron.utils import atomic_dir, write_json

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as root:
        tmp, final = root / layout.RELEASE, out.resolve() / layout.RELEASE
        common = megatron_lm.common_entries(meta, iteration=0,
                                            tokenizer_model=final / TOKENIZER_DIR if tokenizer_files else None)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
        try:
            with single_process_group():
                nbytes = write_torch_dist(tmp, tensors, num_layers, staging, mapping.extra_state_keys(), common)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for name, src in (tokenizer_files or {}).items():
            dst = tmp / TOKENIZER_DIR / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        write_json(tmp / META_NAME, meta)
        megatron_lm.write_args_file(tmp, meta, final)
        if check is not None:
            check(tmp)
        layout.write_manifest(tmp)
        layout.write_tracker(root, layout.RELEASE)
    return nbytes


# -- file checksums (the checkpoint manifest's, reused for prepared data) -----------------------------------
def file_checksum(path: str | os.PathLike, algorithm: str | None = None) -> tuple[str, str]:
    """(algorithm, checksum of every byte of `path`): xxh3_64 as checkpoint manifests (crc32 without xxhash)."""
    from cpt_megatron.checkpoint import layout

    algorithm = algorithm or layout._algorithm()
    return algorithm, layout._digest(Path(path), algorithm)


SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 1 << 20


def sampled_checksum(path: str | os.PathLike, algorithm: str | None = None) -> tuple[str, str]:
    """(algorithm, checksum of SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES spread evenly over `path`, first and last
    included, plus its size): reads at most 64 MiB whatever the size. Catches truncation and damage that hits a
    sampled block; damage between blocks goes unseen (docs/reliability.md: the trade-off)."""
    import zlib

    from cpt_megatron.checkpoint import layout

    algorithm = algorithm or layout._algorithm()
    size = os.path.getsize(path)
    n = max(1, min(SAMPLE_BLOCKS, -(-size // SAMPLE_BLOCK_BYTES)))
    last = max(0, size - SAMPLE_BLOCK_BYTES)
    offsets = sorted({last * i // max(1, n - 1) for i in range(n)})
    if algorithm == "xxh3_64":
        import xxhash

        h = xxhash.xxh3_64(str(size).encode())
        update, result = h.update, h.hexdigest
    else:
        state = [zlib.crc32(str(size).encode())]
        update, result = (lambda b: state.__setitem__(0, zlib.crc32(b, state[0]))), (lambda: f"{state[0]:08x}")
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            update(f.read(SAMPLE_BLOCK_BYTES))
    return algorithm, result()


_VERIFIED: dict[str, float] = {}


def open_checkpoint(ckpt_dir: str | os.PathLike, *, collective: bool = False) -> Path:
    """The iteration folder of `ckpt_dir` (any layout), its manifest checked once per process (sizes + checksums).

    collective=True (every rank of an initialized process group calls it, as `load_model_weights` does):
    rank 0 alone reads and checksums the files and broadcasts its verdict, so a 70B base is read once
    per job instead of once per rank; every rank raises the same one-line error when it is damaged."""
    from cpt_megatron.checkpoint import layout

    folder = layout.resolve(ckpt_dir)
    man = folder / layout.MANIFEST
    stamp = man.stat().st_mtime if man.is_file() else 0.0
    if _VERIFIED.get(str(folder)) != stamp:
        dist = torch.distributed
        if collective and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            verdict = [None]
            if dist.get_rank() == 0:
                try:
                    layout.check_manifest(folder)
                except CptError as e:
                    verdict[0] = str(e)
            dist.broadcast_object_list(verdict, src=0)
            if verdict[0] is not None:
                raise CptError(verdict[0])
        else:
            layout.check_manifest(folder)
        _VERIFIED[str(folder)] = stamp
    return folder


def ckpt_tensor_keys(ckpt_dir: str | os.PathLike) -> dict:
    """{key: ShardedTensor metadata (global shape, dtype)} for the tensors in a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    from cpt_megatron.checkpoint.layout import read_errors

    folder = open_checkpoint(ckpt_dir)
    if not (folder / "metadata.json").is_file():
        raise CptError(f"{folder}: not a megatron-core distributed checkpoint (no metadata.json)")
    with read_errors(folder):
        return dist_checkpointing.load_tensors_metadata(str(folder))


def read_ckpt_tensor(ckpt_dir, key: str, meta, layer: int | None) -> torch.Tensor:
    """One global tensor (one layer's slice for stacked layer keys) from a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from cpt_megatron.checkpoint.layout import read_errors, resolve

    ckpt_dir = resolve(ckpt_dir)
    shape = tuple(meta.global_shape)
    if layer is None:
        st = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta.dtype), replica_id=0)
    else:
        # a (1, ...) slice with an explicit layer offset (no prepend axis: that legacy path wants every layer)
        st = ShardedTensor.from_rank_offsets(key, torch.empty((1, *shape[1:]), dtype=meta.dtype),
                                             (0, layer, shape[0]), replica_id=0)
    with read_errors(ckpt_dir):
        out = dist_checkpointing.load({"t": st}, str(ckpt_dir), validate_access_integrity=False)
    return out["t"] if layer is None else out["t"][0]


# -- training/runtime side ------------------------------------------------------------------------------
def _ckpt_object_keys(ckpt_dir) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    from cpt_megatron.checkpoint.layout import read_errors

    with read_errors(ckpt_dir):
        md = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {k.split("/shard_")[0] for k in md.state_dict_metadata}


def load_model_weights(chunks, ckpt_dir: str | os.PathLike) -> None:
    """Load model weights from a torch_dist checkpoint into this rank's chunks, whatever the layout.

    Strict about missing model tensors (CptError naming them); ignores every other key (optimizer state,
    RNG, ...), so it works on imported and on training checkpoints. Call on every rank (collective).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    from cpt_megatron.checkpoint.layout import read_errors

    ckpt_dir = str(open_checkpoint(ckpt_dir, collective=True))
    available = ckpt_tensor_keys(ckpt_dir)
    objects = _ckpt_object_keys(ckpt_dir)
    state = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    missing, skipped = set(), set()
    for sd in state.values():
        for k in list(sd):
            v = sd[k]
            if isinstance(v, ShardedObject) and v.key not in objects:
                skipped.add(k)  # e.g. `_extra_state` absent from a foreign checkpoint: keep the module's own
                del sd[k]
        base, _ = extract_sharded_base(sd)
        for v in _leaves(base):
            if isinstance(v, ShardedTensor) and v.key not in available:
                missing.add(v.key)
            elif hasattr(v, "key") and not isinstance(v, (ShardedTensor, ShardedObject)) and v.key not in available:
                missing.add(v.key)
    if missing:
        raise CptError(f"{ckpt_dir}: checkpoint lacks model tensor(s) {sorted(missing)}; it was written for a "
                       "different architecture (check tie_word_embeddings / qkv bias)")
    with read_errors(ckpt_dir):
        loaded = dist_checkpointing.load(state, ckpt_dir)
    for i, c in enumerate(chunks):
        res = c.load_state_dict(loaded[f"model{i}"], strict=False)
        bad = [k for k in res.missing_keys if not k.endswith("_extra_state")]
        if bad or res.unexpected_keys:
            raise CptError(f"{ckpt_dir}: state dict mismatch: missing {bad}, unexpected {res.unexpected_keys}")


def _leaves(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _leaves(v)
    elif isinstance(d, list):
        for v in d:
            yield from _leaves(v)
    else:
        yield d
