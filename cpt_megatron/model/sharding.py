"""Global <-> local parameter names and TP slicing for megatron-core GPTModel chunks.

"Global" tensors are the full, unsharded megatron-core parameters named as in a TP1/PP1 model's
`state_dict()` with the global layer index (`decoder.layers.7.mlp.linear_fc1.weight`) and the padded
vocab. Each rank's parameters are slices of them:

| kind       | tensors                                    | TP slicing                                  |
|------------|--------------------------------------------|---------------------------------------------|
| vocab      | word_embeddings, output_layer              | dim 0 (padded vocab rows), contiguous       |
| column     | linear_qkv weight/bias                     | dim 0, contiguous (whole query groups)      |
| glu        | linear_fc1 ([gate; up])                    | gate and up split separately: [gate_r; up_r] |
| row        | linear_proj, linear_fc2                    | dim 1, contiguous                           |
| replicated | norms                                      | none                                        |

The global layer index of a local layer is `layer.layer_number - 1` (megatron-core numbers layers
globally, PP and virtual stages included).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

from cpt_megatron.errors import CptError

__all__ = [
    "ShardSpec", "local_param_specs", "local_shard", "global_shape", "load_global_tensors", "global_init_tensor",
]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    global_name: str
    kind: str  # vocab | column | glu | row | replicated


def _kind(suffix: str) -> str:
    if suffix.endswith(("word_embeddings.weight",)) or suffix == "output_layer.weight":
        return "vocab"
    if "linear_qkv." in suffix and not suffix.endswith("layer_norm_weight"):
        return "column"
    if suffix.endswith("linear_fc1.weight"):
        return "glu"
    if suffix.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    return "replicated"


# TE spec names its fused norms differently; we always speak the local-spec names globally.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def local_param_specs(chunk: torch.nn.Module) -> dict[str, ShardSpec]:
    """Map each local parameter name of one model chunk to its global name and slicing kind."""
    specs = {}
    layers = chunk.decoder.layers if hasattr(chunk, "decoder") else []
    for name, _ in chunk.named_parameters():
        m = _LAYER_RE.match(name)
        if m:
            local_idx, rest = int(m.group(1)), m.group(2)
            rest = _TE_TO_LOCAL.get(rest, rest)
            global_name = f"decoder.layers.{layers[local_idx].layer_number - 1}.{rest}"
        elif name == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
            global_name = "embedding.word_embeddings.weight"  # tied: the last stage's copy of the embedding
        else:
            global_name = name
        specs[name] = ShardSpec(global_name, _kind(global_name))
    return specs


def local_shard(kind: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a global tensor."""
    if tp_size == 1 or kind == "replicated":
        return full
    if kind in ("vocab", "column"):
        return full.chunk(tp_size, dim=0)[tp_rank]
    if kind == "row":
        return full.chunk(tp_size, dim=1)[tp_rank]
    if kind == "glu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    raise CptError(f"unknown shard kind {kind!r}")


def global_shape(kind: str, local: torch.Size, tp_size: int) -> tuple[int, ...]:
    shape = list(local)
    if kind in ("vocab", "column", "glu"):
        shape[0] *= tp_size
    elif kind == "row":
        shape[1] *= tp_size
    return tuple(shape)


@torch.no_grad()
def load_global_tensors(chunks, get_global: Callable[[str], torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Fill every parameter of `chunks` from `get_global(global_name)` (full tensor), sliced for this rank."""
    for chunk in chunks:
        specs = local_param_specs(chunk)
        for name, param in chunk.named_parameters():
            spec = specs[name]
            shard = local_shard(spec.kind, get_global(spec.global_name), tp_rank, tp_size)
            if shard.shape != param.shape:
                raise CptError(f"{spec.global_name}: shard shape {tuple(shard.shape)} != parameter {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))


def global_init_tensor(global_name: str, shape, seed: int, std: float = 0.02) -> torch.Tensor:
    """Deterministic init of a GLOBAL tensor from (seed, name): identical whatever the layout."""
    import zlib

    if global_name.endswith(("layernorm.weight", "layer_norm_weight", "final_layernorm.weight")):
        return torch.ones(shape)
    if global_name.endswith(".bias"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
    return torch.randn(shape, generator=g) * std
