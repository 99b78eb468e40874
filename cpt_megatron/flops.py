"""The one definition of model FLOPs, parameter counts, GPU peak FLOP/s and MFU.

Shared by the trainer (MFU in the log line), `cpt estimate` and the benches, so the three always agree.
Pure Python, no torch import: data-preparation nodes and the estimator import it for free.

Legend (per transformer layer unless said otherwise):
  V vocab_size, h hidden_size, f ffn_hidden_size, L num_layers, a num_heads, g num_kv_heads,
  d head_dim (a*d need not equal h), s sequence length, D training tokens.

Parameter count (`param_count`), a SwiGLU Llama layer with RMSNorm and no biases unless `qkv_bias`:
  attention  h*a*d (q) + 2*h*g*d (k, v) + a*d*h (o)  [+ a*d + 2*g*d when qkv_bias, e.g. Qwen2]
  mlp        3*h*f (gate, up, down)
  norms      2*h
  total      L*layer + V*h (input embedding) + V*h (output head, unless tied) + h (final norm)

Training FLOPs per token (`train_flops_per_token`), forward + backward = 3x forward, 2 FLOPs per MAC:
  dense      6 * N_dense, N_dense = L*(attention + mlp matmul weights) + V*h
             The output head is a matmul whether or not it is tied to the embedding; the input embedding
             is a lookup and costs nothing. Norms, biases, rotary, softmax and activations are ignored
             (< 0.1%).
  attention  causal:  6 * L * s * a*d      (QK^T and A.V: 3 * 2 matmuls * 2 FLOPs * s * a*d, halved by
             the causal mask as FlashAttention/cuDNN skip the masked half)
             full:   12 * L * s * a*d
  total      6 * N_dense + 6 * L * s * a*d                       (causal)

`six_nd_flops` is the rule of thumb C = 6 N D with N = all parameters (Chinchilla's convention): it is
what published budgets quote ("8B x 50B tokens = 2.4e21 FLOPs"). For Llama-3-8B at s = 8192 the
detailed count is ~6% above it (the attention term outweighs the uncounted input embedding).

MFU (`mfu`) = achieved model FLOP/s / peak dense bf16 FLOP/s. Model FLOPs exclude activation
recomputation (that would be HFU), so recomputation lowers MFU, as in PaLM (Chowdhery et al. 2022).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import ModelArch, padded_vocab_size  # noqa: F401  (re-exported)

__all__ = [
    "ModelShape",
    "GpuSpec",
    "GPUS",
    "PRESETS",
    "as_shape",
    "param_count",
    "layer_params",
    "dense_matmul_params",
    "train_flops_per_token",
    "six_nd_flops",
    "peak_flops",
    "gpu_spec",
    "mfu",
    "padded_vocab_size",
    "preset",
    "preset_names",
    "shape_from_hf_config",
    "load_hf_config",
]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The shape of a Llama-family decoder: everything FLOPs and memory depend on."""

    vocab_size: int
    """Tokenizer vocabulary (unpadded; see `padded_vocab_size`)."""
    hidden_size: int
    ffn_hidden_size: int
    """SwiGLU inner width (HF `intermediate_size`)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads (GQA groups); equal to num_heads for MHA."""
    head_dim: int
    tied: bool = False
    """Output head shares the input embedding's weights."""
    qkv_bias: bool = False
    """Biases on q, k, v projections (Qwen2)."""
    max_position_embeddings: int = 4096
    name: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or v <= 0):
                raise CptError(f"model shape: {f.name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise CptError(
                f"model shape: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )


def as_shape(arch: Any) -> ModelShape:
    """Accept a ModelShape or any duck type with the same attribute names."""
    if isinstance(arch, ModelShape):
        return arch
    kw = {f.name: getattr(arch, f.name) for f in fields(ModelShape) if hasattr(arch, f.name)}
    return ModelShape(**kw)


def _attention_params(m: ModelShape) -> int:
    a_d, g_d = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return m.hidden_size * a_d + 2 * m.hidden_size * g_d + a_d * m.hidden_size


def layer_params(arch: Any) -> int:
    """Parameters of one transformer layer (attention, biases, SwiGLU MLP, two norms)."""
    m = as_shape(arch)
    return _layer_params(m)


def _layer_params(m: ModelShape) -> int:
    bias = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim if m.qkv_bias else 0
    return _attention_params(m) + bias + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size


def param_count(arch: Any) -> int:
    """All parameters: layers, input embedding, output head (unless tied), final norm."""
    m = as_shape(arch)
    embed = m.vocab_size * m.hidden_size
    return m.num_layers * _layer_params(m) + embed + (0 if m.tied else embed) + m.hidden_size


def dense_matmul_params(arch: Any) -> int:
    """N_dense: weights that take part in a matmul per token (layers' linears + the output head)."""
    m = as_shape(arch)
    layer = _attention_params(m) + 3 * m.hidden_size * m.ffn_hidden_size
    return m.num_layers * layer + m.vocab_size * m.hidden_size


def train_flops_per_token(arch: Any, seq_len: int, causal: bool = True) -> float:
    """Model FLOPs per trained token (forward + backward): 6*N_dense + 6*L*s*a*d (causal; 12 if not)."""
    if seq_len <= 0:
        raise CptError(f"seq_len must be positive, got {seq_len}")
    m = as_shape(arch)
    attention = (6 if causal else 12) * m.num_layers * seq_len * m.num_heads * m.head_dim
    return 6.0 * dense_matmul_params(m) + attention


def six_nd_flops(arch: Any, tokens: float) -> float:
    """The 6ND rule of thumb with N = all parameters (no attention term)."""
    return 6.0 * param_count(arch) * tokens




# ----------------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_bf16_flops: float
    """Dense (no 2:4 sparsity) bf16 tensor-core FLOP/s from the vendor datasheet."""
    memory_gib: float
    """Device memory as the driver reports it (GiB)."""
    gpus_per_node: int = 8


GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("a100", 312e12, 80),  # A100 SXM 80GB
    "a100-40gb": GpuSpec("a100-40gb", 312e12, 40),
    "h100": GpuSpec("h100", 989e12, 80),  # H100 SXM5 (989.4 TFLOP/s dense bf16)
    "h100-pcie": GpuSpec("h100-pcie", 756e12, 80),
    "h200": GpuSpec("h200", 989e12, 141),  # same die as H100 SXM, 141 GB HBM3e
    "b200": GpuSpec("b200", 2.25e15, 180),  # HGX B200: 2.25 PFLOP/s dense bf16 per GPU
    "l40s": GpuSpec("l40s", 362e12, 48),
    "a10": GpuSpec("a10", 125e12, 24, gpus_per_node=4),
    # Placeholder so MFU and estimates are defined on CPU runs; not a real peak.
    "cpu": GpuSpec("cpu", 1e12, 64, gpus_per_node=1),
}
_GPU_ALIASES = {"h100-sxm": "h100", "a100-80gb": "a100", "a100-sxm": "a100", "h200-sxm": "h200"}


def gpu_spec(gpu: str) -> GpuSpec:
    key = gpu.lower().strip()
    key = _GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise CptError(f"unknown GPU type {gpu!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def peak_flops(gpu: str) -> float:
    """Peak dense bf16 FLOP/s of one GPU of this type."""
    return gpu_spec(gpu).peak_bf16_flops


def mfu(tokens_per_s: float, flops_per_token: float, gpu: str, n_gpus: int) -> float:
    """Model FLOPs utilization: tokens_per_s is the whole job's throughput over n_gpus GPUs."""
    if n_gpus <= 0:
        raise CptError(f"n_gpus must be positive, got {n_gpus}")
    return tokens_per_s * flops_per_token / (peak_flops(gpu) * n_gpus)


# ----------------------------------------------------------------------------------------------------
# Presets: the fields of each model's HF config.json that the shape needs (values from the hub configs).

_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
_LLAMA3_70B = {
    **_LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
_LLAMA31 = {
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "llama3-8b": _LLAMA3_8B,
    "llama3-70b": _LLAMA3_70B,
    "llama3.1-8b": {**_LLAMA3_8B, **_LLAMA31},
    "llama3.1-70b": {**_LLAMA3_70B, **_LLAMA31},
    "llama3.1-405b": {
        **_LLAMA3_8B,
        **_LLAMA31,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
    },
    "mistral-7b": {  # v0.1
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
}
_QKV_BIAS_ARCHS = {"Qwen2ForCausalLM"}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> ModelShape:
    key = name.lower().strip().replace("_", "-")
    if key not in PRESETS:
        raise CptError(f"unknown model preset {name!r}; known: {', '.join(preset_names())} (or pass an HF config.json)")
    return shape_from_hf_config(PRESETS[key], name=key)


def shape_from_hf_config(cfg: dict[str, Any], name: str = "") -> ModelShape:
    """A ModelShape from a Llama/Mistral/Qwen2-style HF config dict, parsed by the trainer's own parser
    (model/arch.py: same support set, same qkv-bias rule)."""
    arch = ModelArch.from_hf_config(cfg, source=f"HF config {name}".strip())
    return _shape_of(arch, name or str(cfg.get("_name_or_path") or ""))


def _shape_of(arch: ModelArch, name: str) -> ModelShape:
    return ModelShape(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
                      num_layers=arch.num_layers, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                      head_dim=arch.head_dim, tied=arch.tie_word_embeddings, qkv_bias=arch.qkv_bias,
                      max_position_embeddings=arch.max_position_embeddings, name=name)


def load_hf_config(path: str | os.PathLike) -> ModelShape:
    """Read an HF config.json (or a model directory holding one) into a ModelShape."""
    from cpt_megatron.model.arch import load_hf_config as load_arch

    p = os.path.abspath(os.fspath(path))
    return _shape_of(load_arch(p), os.path.basename(p if os.path.isdir(p) else os.path.dirname(p)))
