"""Layer specs: which attention / norm / MLP kernels the model uses, and why (shown by `cpt env`).

- Transformer Engine importable -> megatron-core's TE spec (fused norm+linear, TE attention).
- Otherwise megatron-core's local spec with our `SDPAttention` (never the unfused DotProductAttention,
  measured 2x slower and 2x the memory on H200) and our SP-capable `RMSNorm`.
"""

from __future__ import annotations

import dataclasses

from cpt_megatron.errors import CptError
from cpt_megatron.utils import have_module

__all__ = ["KernelChoice", "select_kernels", "layer_spec"]


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    spec: str  # "te" | "local"
    attention: str
    norm: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def select_kernels(spec: str = "auto") -> KernelChoice:
    """spec: 'auto' (TE when importable and CUDA present), 'te', or 'local'."""
    import torch

    te = have_module("transformer_engine") and torch.cuda.is_available()
    if spec == "te" and not te:
        raise CptError("model.spec=te but Transformer Engine is not importable (or no CUDA); use model.spec=auto")
    if spec not in ("auto", "te", "local"):
        raise CptError(f"model.spec must be auto|te|local, got {spec!r}")
    if spec == "te" or (spec == "auto" and te):
        return KernelChoice("te", "transformer_engine.DotProductAttention", "transformer_engine.RMSNorm (fused with linear)",
                            ("Transformer Engine is importable and CUDA is present",))
    reasons = ["Transformer Engine not importable" if not have_module("transformer_engine") else "model.spec=local requested"]
    if torch.cuda.is_available():
        attn = "torch SDPA (flash / cuDNN / mem-efficient backend chosen by torch)"
    else:
        attn = "torch SDPA (CPU math/flash-cpu kernel)"
    reasons.append("SDPA instead of megatron-core's unfused DotProductAttention (O(s^2) memory, ~2x slower)")
    reasons.append("our RMSNorm: megatron-core's WrappedTorchNorm refuses sequence parallel")
    return KernelChoice("local", attn, "cpt_megatron RMSNorm (fp32 compute, SP-aware)", tuple(reasons))


def layer_spec(choice: KernelChoice, qk_layernorm: bool = False, plan=None):
    """Return (layer ModuleSpec, final-norm class or ModuleSpec) for GPTModel.

    `plan` (a kernels.KernelPlan) selects the SDPA backend order and the fused RMSNorm on the local spec;
    None or an all-default plan gives exactly the plain classes (CPU runs unchanged)."""
    if choice.spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm), TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from cpt_megatron.model.layers import RMSNorm, SDPAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    sub = spec.submodules
    norm = RMSNorm
    if plan is not None and plan.fused_norm == "compile":
        norm = ModuleSpec(module=RMSNorm, params={"fused": True})
    attn = SDPAttention
    if plan is not None and plan.attention_backend != "default":
        attn = ModuleSpec(module=SDPAttention, params={"backend": plan.attention_backend})
    sub.input_layernorm = norm
    sub.pre_mlp_layernorm = norm
    sub.self_attention.submodules.core_attention = attn
    return spec, norm
