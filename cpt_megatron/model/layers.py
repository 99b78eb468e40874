"""Layers we plug into megatron-core's local spec: SDPA core attention and an SP-capable RMSNorm.

Shapes: s = sequence, b = micro-batch, np = attention heads on this TP rank, ng = query groups (KV heads)
on this rank, hn = head dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention import sdpa_kernel

from cpt_megatron.errors import CptError
from cpt_megatron.model.kernels import compiled_rms_norm, rms_norm, sdpa_backends

__all__ = ["SDPAttention", "RMSNorm"]


class SDPAttention(MegatronModule):
    """Core attention via `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / mem-efficient
    kernels on GPU; never materializes the s x s scores on those backends). Causal, GQA through
    `enable_gqa` (no K/V expansion copy). Replaces megatron-core's unfused `DotProductAttention`.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "default",
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise CptError("SDPAttention does not support context parallelism (use the Transformer Engine spec)")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        # SDPA backends in priority order (kernels.resolve_kernels); None = torch's default choice
        self.backends = sdpa_backends(backend)
        # cuDNN / mem-efficient kernels are not guaranteed to take GQA (enable_gqa): expand K/V for them
        self.expand_kv = backend.split(",")[0] in ("cudnn", "efficient")

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise CptError("SDPAttention: packed sequences and attention_bias are not supported")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
        if self.expand_kv and q.shape[1] != k.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        ctx = sdpa_kernel(self.backends, set_priority=True) if self.backends else contextlib.nullcontext()
        with ctx:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=causal, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
            )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 like HF Llama; weights marked `sequence_parallel` under SP so megatron's
    finalize_model_grads all-reduces their gradients over the TP group (megatron-core's local
    WrappedTorchNorm refuses sequence parallel)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, fused: bool = False, **kwargs):
        super().__init__()
        self.eps = eps
        self._norm = compiled_rms_norm() if fused else rms_norm  # same math; fused = one torch.compile kernel
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype,
                       device="cpu" if config.use_cpu_initialization else torch.cuda.current_device())
        )
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x):
        return self._norm(x, self.weight, self.eps)
