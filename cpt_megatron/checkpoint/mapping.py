"""HF Llama-family tensor names <-> megatron-core torch_dist checkpoint keys, and the value transforms.

Megatron keys are the ShardedTensor keys of `GPTModel.sharded_state_dict()` (TP-independent, layers
stacked on a leading axis, norms under the TE names even for the local spec):

| megatron key (layer i = slice i of the leading axis)       | HF tensor(s)                                    |
|------------------------------------------------------------|-------------------------------------------------|
| embedding.word_embeddings.weight  [Vp, H]                  | model.embed_tokens.weight (+ zero padding rows) |
| decoder.layers.self_attention.linear_qkv.layer_norm_weight | model.layers.i.input_layernorm.weight           |
| decoder.layers.self_attention.linear_qkv.weight            | q/k/v_proj.weight packed per query group        |
| decoder.layers.self_attention.linear_qkv.bias (Qwen2)      | q/k/v_proj.bias packed the same way             |
| decoder.layers.self_attention.linear_proj.weight           | self_attn.o_proj.weight                         |
| decoder.layers.mlp.linear_fc1.layer_norm_weight            | post_attention_layernorm.weight                 |
| decoder.layers.mlp.linear_fc1.weight                       | cat([gate_proj, up_proj], 0)                    |
| decoder.layers.mlp.linear_fc2.weight                       | mlp.down_proj.weight                            |
| decoder.final_layernorm.weight                             | model.norm.weight                               |
| output_layer.weight (untied only) [Vp, H]                  | lm_head.weight (+ zero padding rows)            |

QKV packing (ng query groups, r = nh/ng query heads per group, d = head dim): per group its r query
heads, then one key head, then one value head. No RoPE permutation (both sides rotate-half).
"""

from __future__ import annotations

import dataclasses

import torch

from cpt_megatron.model.arch import ModelArch

__all__ = [
    "TensorSpec", "megatron_specs", "extra_state_keys", "hf_names", "to_megatron", "to_hf", "pack_qkv",
    "unpack_qkv", "EMBED_KEY", "OUTPUT_KEY",
]

EMBED_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"
FINAL_NORM_KEY = "decoder.final_layernorm.weight"
_L = "decoder.layers."
QKV, QKV_BIAS = _L + "self_attention.linear_qkv.weight", _L + "self_attention.linear_qkv.bias"
PROJ, LN1 = _L + "self_attention.linear_proj.weight", _L + "self_attention.linear_qkv.layer_norm_weight"
FC1, FC2, LN2 = _L + "mlp.linear_fc1.weight", _L + "mlp.linear_fc2.weight", _L + "mlp.linear_fc1.layer_norm_weight"
# megatron-core also checkpoints an `_extra_state` object per linear layer (None for the local spec).
_EXTRA = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One global megatron tensor: `key`, `layer` (None for non-layer tensors) and the per-layer shape."""

    key: str
    layer: int | None
    shape: tuple[int, ...]


def megatron_specs(arch: ModelArch, padded_vocab: int) -> list[TensorSpec]:
    """Every model tensor of a TP1 checkpoint, in a streaming-friendly order."""
    H, F, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * d
    out = [TensorSpec(EMBED_KEY, None, (padded_vocab, H))]
    for i in range(arch.num_layers):
        out += [TensorSpec(LN1, i, (H,)), TensorSpec(QKV, i, (qkv_rows, H))]
        if arch.qkv_bias:
            out.append(TensorSpec(QKV_BIAS, i, (qkv_rows,)))
        out += [TensorSpec(PROJ, i, (H, arch.num_heads * d)), TensorSpec(LN2, i, (H,)),
                TensorSpec(FC1, i, (2 * F, H)), TensorSpec(FC2, i, (H, F))]
    out.append(TensorSpec(FINAL_NORM_KEY, None, (H,)))
    if not arch.tie_word_embeddings:
        out.append(TensorSpec(OUTPUT_KEY, None, (padded_vocab, H)))
    return out


def extra_state_keys() -> list[str]:
    return [f"{_L}{m}._extra_state" for m in _EXTRA]


def hf_names(arch: ModelArch) -> list[str]:
    """HF tensor names of the architecture, in HF's usual order (q, k, v adjacent; gate, up adjacent)."""
    names = ["model.embed_tokens.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names.append(p + "input_layernorm.weight")
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if arch.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    H, F, d, V = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.vocab_size
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    by_suffix = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H), "self_attn.v_proj.weight": (kv, H),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (H, q), "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H),
        "mlp.down_proj.weight": (H, F),
    }
    out = {}
    for n in hf_names(arch):
        if n in ("model.embed_tokens.weight", "lm_head.weight"):
            out[n] = (V, H)
        elif n == "model.norm.weight":
            out[n] = (H,)
        else:
            out[n] = by_suffix[n.split(".", 3)[3]]
    return out


# -- value transforms ----------------------------------------------------------------------------------
def pack_qkv(arch: ModelArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v (weights [rows, H] or biases [rows]) -> megatron's grouped linear_qkv layout."""
    ng, d = arch.num_kv_heads, arch.head_dim
    r = arch.num_heads // ng
    tail = q.shape[1:]
    return torch.cat([q.reshape(ng, r * d, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], dim=1).reshape(
        (arch.num_heads + 2 * ng) * d, *tail
    )


def unpack_qkv(arch: ModelArch, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, d = arch.num_kv_heads, arch.head_dim
    r = arch.num_heads // ng
    tail = qkv.shape[1:]
    g = qkv.reshape(ng, r + 2, d, *tail)
    q = g[:, :r].reshape(arch.num_heads * d, *tail)
    k = g[:, r].reshape(ng * d, *tail)
    v = g[:, r + 1].reshape(ng * d, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)  # padding logits are masked; zeros are inert
    out[: t.shape[0]] = t
    return out


def to_megatron(arch: ModelArch, spec: TensorSpec, get_hf, padded_vocab: int) -> torch.Tensor:
    """Build one global megatron tensor (one layer's slice for layer keys) from HF tensors via `get_hf(name)`."""
    p = f"model.layers.{spec.layer}."
    k = spec.key
    if k == EMBED_KEY:
        return _pad_rows(get_hf("model.embed_tokens.weight"), padded_vocab)
    if k == OUTPUT_KEY:
        return _pad_rows(get_hf("lm_head.weight"), padded_vocab)
    if k == FINAL_NORM_KEY:
        return get_hf("model.norm.weight")
    if k == LN1:
        return get_hf(p + "input_layernorm.weight")
    if k == LN2:
        return get_hf(p + "post_attention_layernorm.weight")
    if k == QKV:
        return pack_qkv(arch, *(get_hf(p + f"self_attn.{x}_proj.weight") for x in "qkv"))
    if k == QKV_BIAS:
        return pack_qkv(arch, *(get_hf(p + f"self_attn.{x}_proj.bias") for x in "qkv"))
    if k == PROJ:
        return get_hf(p + "self_attn.o_proj.weight")
    if k == FC1:
        return torch.cat([get_hf(p + "mlp.gate_proj.weight"), get_hf(p + "mlp.up_proj.weight")], dim=0)
    if k == FC2:
        return get_hf(p + "mlp.down_proj.weight")
    raise KeyError(k)


def hf_source(arch: ModelArch, name: str) -> tuple[str, int | None]:
    """The megatron (key, layer) an HF tensor lives in."""
    if name == "model.embed_tokens.weight":
        return EMBED_KEY, None
    if name == "lm_head.weight":
        return (EMBED_KEY if arch.tie_word_embeddings else OUTPUT_KEY), None
    if name == "model.norm.weight":
        return FINAL_NORM_KEY, None
    _, _, i, rest = name.split(".", 3)
    key = {
        "input_layernorm.weight": LN1, "post_attention_layernorm.weight": LN2, "self_attn.o_proj.weight": PROJ,
        "mlp.gate_proj.weight": FC1, "mlp.up_proj.weight": FC1, "mlp.down_proj.weight": FC2,
        "self_attn.q_proj.bias": QKV_BIAS, "self_attn.k_proj.bias": QKV_BIAS, "self_attn.v_proj.bias": QKV_BIAS,
    }.get(rest, QKV)
    return key, int(i)


def to_hf(arch: ModelArch, name: str, mcore: torch.Tensor) -> torch.Tensor:
    """One HF tensor from the megatron tensor `hf_source(name)` names (padding rows stripped)."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return mcore[: arch.vocab_size]
    rest = name.split(".", 3)[3] if name.startswith("model.layers.") else name
    if rest.startswith("self_attn.") and rest[10] in "qkv" and rest[11:17] == "_proj.":
        return unpack_qkv(arch, mcore)["qkv".index(rest[10])]
    if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        gate, up = mcore.chunk(2, dim=0)
        return gate if rest.startswith("mlp.gate") else up
    return mcore
