"""Hugging Face Llama-family `config.json` -> one typed description of the architecture (`ModelArch`).

Supported: Llama 2/3/3.1 (rope_theta, rope scaling type `llama3`), Mistral (full attention only: a
sliding window shorter than the training sequence is refused), Qwen2 (bias on QKV), SmolLM2 (Llama with
tied embeddings). Everything else gets a clear error that lists what is supported.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = ["ModelArch", "SUPPORTED_MODEL_TYPES", "load_hf_config", "padded_vocab_size"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
"""`architectures` entry -> model_type, for configs that give only the former."""


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron pads the embedding rows to a multiple of divisible_by * tp (each TP shard aligned)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelArch:
    """A Llama-family decoder, as HF describes it (no parallelism, no padding)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    """llama3-style scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}."""
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    torch_dtype: str | None = None
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelArch:
        mt = cfg.get("model_type") or next((_MODEL_TYPES[a] for a in cfg.get("architectures") or []
                                            if a in _MODEL_TYPES), None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CptError(
                f"{source}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)"
            )

        def need(key):
            if key not in cfg or cfg[key] is None:
                raise CptError(f"{source}: missing required key {key!r} for model_type {mt!r}")
            return cfg[key]

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CptError(f"{source}: hidden_act {act!r} is not supported (Llama-family models use 'silu')")
        if cfg.get("mlp_bias"):
            raise CptError(f"{source}: mlp_bias=true is not supported (Llama-family MLPs have no bias)")
        if mt == "llama" and cfg.get("attention_bias"):
            raise CptError(f"{source}: attention_bias=true (bias on q/k/v/o) is not supported; only Qwen2's QKV bias is")
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise CptError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = cfg.get("head_dim") or hidden // heads
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default") else None)
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                rope_scaling = None
            elif kind == "llama3":
                rope_scaling = {
                    "factor": float(scaling["factor"]),
                    "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
                    "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
                    "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 8192)),
                }
            else:
                raise CptError(f"{source}: rope scaling type {kind!r} is not supported; supported: llama3 (or none)")
        sliding = cfg.get("sliding_window")
        if mt == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            model_type=mt,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=(mt == "qwen2"),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            hf_config=dict(cfg),
        )

    @property
    def tied(self) -> bool:  # the name cpt_megatron.flops uses
        return self.tie_word_embeddings

    # -- checks ---------------------------------------------------------------------------------------
    def check_seq_len(self, seq_len: int) -> None:
        """Mistral-style sliding windows are not trained: allowed only when they never bind."""
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise CptError(
                f"this {self.model_type} config uses sliding-window attention (window {self.sliding_window}) and the "
                f"training sequence length {seq_len} exceeds it; sliding windows are not supported in training: use "
                f"seq_len <= {self.sliding_window} (identical to full attention) or a config with sliding_window null"
            )

    def check_parallel(self, tp: int) -> None:
        if self.num_kv_heads % tp:
            raise CptError(f"tp={tp} must divide num_key_value_heads={self.num_kv_heads} (each TP rank holds whole KV groups)")
        if self.num_heads % tp:
            raise CptError(f"tp={tp} must divide num_attention_heads={self.num_heads}")
        if self.ffn_hidden_size % tp:
            raise CptError(f"tp={tp} must divide intermediate_size={self.ffn_hidden_size}")

    # -- derived --------------------------------------------------------------------------------------
    def rope_inv_freq(self):
        """Rotary inverse frequencies exactly as HF computes them (default or llama3 scaling), on the host (the
        caller moves them to the model's device)."""
        import torch

        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
        if self.rope_scaling is None:
            return inv
        s = self.rope_scaling
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_llama = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_llama)


def load_hf_config(path: str | os.PathLike) -> ModelArch:
    """Read an HF `config.json` (the file or its directory) into a ModelArch."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise CptError(f"HF config not found: {f} (give a config.json or a model directory containing one)")
    from cpt_megatron.utils import read_json

    cfg = read_json(f, "HF config", hint="give an HF config.json or a model directory holding one")
    if not isinstance(cfg, dict):
        raise CptError(f"HF config {f}: expected a JSON object, got {type(cfg).__name__}")
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers keep the LM config inside
        cfg = cfg["text_config"]
    return ModelArch.from_hf_config(cfg, source=str(f))
