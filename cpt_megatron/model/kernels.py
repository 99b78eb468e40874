"""Switchable fused kernels for the local (non-TE) spec, and the rule that picks them (`resolve_kernels`).

Every option is "auto" by default: the fastest available on a CUDA GPU, and on CPU exactly today's
unfused math (CPU runs stay bit-identical). Each resolved choice carries the reason it was chosen, which
`cpt env` prints. Explicit values force a path (tests use that to check numerics on CPU).

Shapes: N = tokens in the micro-batch (s * b), H = hidden, V = vocab rows (true vocab, padding sliced off).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from cpt_megatron.config import ATTENTION_BACKENDS, FUSED_CE_CHOICES  # the allowed values live with the type
from cpt_megatron.errors import CptError
from cpt_megatron.utils import have_module

__all__ = [
    "KernelPlan", "resolve_kernels", "ATTENTION_BACKENDS", "FUSED_CE_CHOICES", "rms_norm", "compiled_rms_norm",
    "sdpa_backends", "chunked_linear_cross_entropy", "install_fused_ce", "install_rope", "compile_layers",
]

IGNORE_INDEX = -100
CE_CHUNK_TOKENS = 2048
"""Tokens per chunk of the chunked linear-CE: 2048 x 128256 fp32 logits = 1 GiB transient."""


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Resolved kernel choices (never "auto") and why each was chosen."""

    attention_backend: str  # "default" (torch's own order) | comma list of SDPA backends in priority order
    fused_norm: str  # compile | off
    fused_rope: str  # te | compile | off
    fused_swiglu: str  # on | off
    fused_ce: str  # liger | compile | chunked | off
    compile: str  # layer | off
    reasons: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_options(opts) -> None:
    """Validate the kernel fields of ModelOptions (they may have been changed after construction)."""
    opts.check_kernels()


def _te_rope() -> bool:
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except Exception:  # pragma: no cover - megatron-core missing
        return False
    return getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None


def resolve_kernels(opts, *, tp: int = 1, sp: bool = False, spec: str = "local", cuda: bool | None = None) -> KernelPlan:
    """Turn ModelOptions' kernel fields into a KernelPlan for this machine and layout."""
    check_options(opts)
    if cuda is None:
        from cpt_megatron.runtime.device import on_gpu

        cuda = on_gpu()
    why: dict[str, str] = {}

    # -- compile (decides whether the element-wise fusions below are needed separately) --------------
    comp = opts.compile
    if spec == "te" and comp == "layer":
        raise ValueError("model.compile=layer with the Transformer Engine spec: TE layers are already fused and "
                         "are not compiled (Megatron-LM never does); use model.compile=auto|off or model.spec=local")
    if comp == "auto":
        comp = "layer" if cuda and spec != "te" else "off"
        why["compile"] = ("TE spec: TE's fused layers run eager (no torch.compile)" if spec == "te" else
                          "CUDA: torch.compile of each TransformerLayer (fuses norm/rope/swiglu/residual)" if cuda
                          else "CPU: eager (unchanged math)")
    else:
        why["compile"] = f"model.compile={comp} requested"

    # -- attention ------------------------------------------------------------------------------------
    ab = opts.attention_backend
    if spec == "te":
        attn = "te"
        why["attention_backend"] = "TE spec: Transformer Engine picks its fused attention"
    elif ab == "auto":
        if cuda:
            major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9
            attn = "cudnn,flash,efficient,math" if major >= 9 else "flash,efficient,math"
            why["attention_backend"] = (f"CUDA sm{major}x: " + ("cuDNN attention first (fastest SDPA kernel on Hopper), "
                                        "then flash" if major >= 9 else "flash first"))
        else:
            attn = "default"
            why["attention_backend"] = "CPU: torch's default SDPA kernel (unchanged math)"
    elif not cuda and ab in ("cudnn", "efficient"):
        attn = "default"
        why["attention_backend"] = f"model.attention_backend={ab} has no CPU kernel; torch's default CPU kernel"
        warnings.warn(why["attention_backend"], stacklevel=2)
    else:
        attn = ab
        why["attention_backend"] = f"model.attention_backend={ab} requested"

    # -- norm -----------------------------------------------------------------------------------------
    norm = opts.fused_norm
    if spec == "te":
        norm, why["fused_norm"] = "off", "TE spec: TE's fused norm+linear"
    elif norm == "auto":
        if not cuda:
            norm, why["fused_norm"] = "off", "CPU: plain fp32 RMSNorm (unchanged math)"
        elif comp == "layer":
            norm, why["fused_norm"] = "off", "fused inside the compiled layer (compile=layer)"
        else:
            norm, why["fused_norm"] = "compile", "CUDA: torch.compile'd (Triton) RMSNorm, same fp32 math"
    else:
        why["fused_norm"] = f"model.fused_norm={norm} requested"

    # -- rope -----------------------------------------------------------------------------------------
    rope = opts.fused_rope
    te_rope = cuda and _te_rope()
    if rope == "te" and not te_rope:
        raise CptError("model.fused_rope=te needs Transformer Engine's fused RoPE and CUDA; use auto|compile|off")
    if rope == "auto":
        if not cuda:
            rope, why["fused_rope"] = "off", "CPU: megatron's unfused RoPE (unchanged math)"
        elif te_rope:
            rope, why["fused_rope"] = "te", "megatron apply_rope_fusion (TE fused RoPE kernel)"
        elif comp == "layer":
            rope, why["fused_rope"] = "off", "no TE fused RoPE; fused inside the compiled layer (compile=layer)"
        else:
            rope, why["fused_rope"] = "compile", "no TE fused RoPE; ours: torch.compile'd RoPE, same math"
    else:
        why["fused_rope"] = f"model.fused_rope={rope} requested"

    # -- swiglu ---------------------------------------------------------------------------------------
    sw = opts.fused_swiglu
    if sw == "auto":
        sw = "on" if cuda else "off"
        why["fused_swiglu"] = ("CUDA: megatron bias_swiglu fusion (bias_activation_fusion + gated_linear_unit)" if cuda
                               else "CPU: unfused silu(a)*b (unchanged math)")
    else:
        why["fused_swiglu"] = f"model.fused_swiglu={sw} requested"

    # -- cross-entropy --------------------------------------------------------------------------------
    ce = opts.fused_ce
    liger = cuda and have_module("liger_kernel") and have_module("triton")
    if ce != "off" and (tp > 1 or sp):
        why["fused_ce"] = (f"tp={tp}{' with sp' if sp else ''}: fused linear-CE supports TP=1 only; megatron's "
                           "vocab_parallel_cross_entropy (already vocab-sharded)")
        if ce != "auto":
            warnings.warn(f"model.fused_ce={ce} ignored: " + why["fused_ce"], stacklevel=2)
        ce = "off"
    elif ce == "auto":
        if not cuda:
            ce, why["fused_ce"] = "off", "CPU: megatron vocab_parallel_cross_entropy (unchanged math)"
        elif liger:
            ce, why["fused_ce"] = "liger", "liger-kernel LigerFusedLinearCrossEntropy (Triton, no [N,V] logits)"
        else:
            ce, why["fused_ce"] = "compile", "liger-kernel not importable: torch.compile'd chunked linear-CE"
    elif ce == "liger" and not liger:
        raise CptError("model.fused_ce=liger needs liger-kernel and triton on a CUDA machine "
                         "(pip install 'cpt-megatron[gpu]'); use auto|compile|chunked|off")
    else:
        why["fused_ce"] = f"model.fused_ce={ce} requested"
    return KernelPlan(attn, norm, rope, sw, ce, comp, why)


# ---------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 RMSNorm exactly as HF Llama: normalize in fp32, cast back, then scale by the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


_compiled: dict[str, object] = {}


def compiled_rms_norm():
    """rms_norm through torch.compile (one Triton kernel on GPU; a C++ kernel on CPU, for tests)."""
    if "norm" not in _compiled:
        _compiled["norm"] = torch.compile(rms_norm, dynamic=False)
    return _compiled["norm"]


# ---------------------------------------------------------------------------------------------------
# SDPA backend selection


def sdpa_backends(plan_value: str):
    """SDPBackend list for torch.nn.attention.sdpa_kernel, or None for torch's default order."""
    if plan_value in ("default", "te"):
        return None
    from torch.nn.attention import SDPBackend

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [names[n] for n in plan_value.split(",")]


# ---------------------------------------------------------------------------------------------------
# Fused linear + cross-entropy (never materializes [N, V] logits for the whole micro-batch)


def _ce_chunk_fwd(h, w, y):
    logits = (h @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    tgt = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = torch.where(y == IGNORE_INDEX, torch.zeros_like(lse), lse - tgt)
    return loss, lse


def _ce_chunk_bwd(h, w, y, lse, g):
    logits = (h @ w.t()).float()
    p = torch.exp(logits - lse.unsqueeze(1))
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), logits.shape[1]).to(p.dtype)
    scale = torch.where(y == IGNORE_INDEX, torch.zeros_like(g), g.float())
    d = ((p - onehot) * scale.unsqueeze(1)).to(h.dtype)
    return d @ w, d.t() @ h


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-token CE of (h @ w.T) computed chunk by chunk; backward recomputes each chunk's logits, so it
    is exact for any per-token upstream gradient (megatron's per-token-loss contract)."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, compiled: bool):
        fwd = _compiled_ce()[0] if compiled else _ce_chunk_fwd
        n = h.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for i in range(0, n, chunk):
            loss[i:i + chunk], lse[i:i + chunk] = fwd(h[i:i + chunk], w, y[i:i + chunk])
        ctx.save_for_backward(h, w, y, lse)
        ctx.chunk, ctx.compiled = chunk, compiled
        return loss

    @staticmethod
    def backward(ctx, g):
        h, w, y, lse = ctx.saved_tensors
        bwd = _compiled_ce()[1] if ctx.compiled else _ce_chunk_bwd
        dh = torch.empty_like(h)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # fp32 accumulation over chunks
        for i in range(0, h.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            dh[sl], dw_i = bwd(h[sl], w, y[sl], lse[sl], g[sl])
            dw += dw_i
        return dh, dw.to(w.dtype), None, None, None


def _compiled_ce():
    if "ce" not in _compiled:
        _compiled["ce"] = (torch.compile(_ce_chunk_fwd, dynamic=False), torch.compile(_ce_chunk_bwd, dynamic=False))
    return _compiled["ce"]


def chunked_linear_cross_entropy(h, w, y, chunk: int = CE_CHUNK_TOKENS, compiled: bool = False):
    """h [N, H], w [V, H], y [N] (IGNORE_INDEX = no loss) -> per-token fp32 loss [N]."""
    return _ChunkedLinearCE.apply(h, w, y, chunk, compiled)


def liger_linear_cross_entropy(h, w, y):
    """liger-kernel 0.8.x, reduction='none' (its backward recomputes per chunk with the per-token grad)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    # positional: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
    # reduction, softcap, return_z_loss, accum_dtype (fp32 weight-grad accumulation)
    out = LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, IGNORE_INDEX, 0.0, 0.0, "none", None,
                                                     False, torch.float32)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.float()


class _DeferredLogits:
    """What the output layer returns in fused-CE mode: the inputs of the logits matmul, not the logits."""

    __slots__ = ("hidden", "weight")

    def __init__(self, hidden, weight):
        self.hidden, self.weight = hidden, weight


def install_fused_ce(model, impl: str, true_vocab: int) -> None:
    """Make a post-process GPTModel compute its training loss with a fused linear-CE (TP=1, no SP).

    The class of `model` and of `model.output_layer` are swapped for thin subclasses (no new parameters:
    state_dict and checkpoints are unchanged). With labels, the output layer hands (hidden, weight) to
    `compute_language_model_loss`; padded vocab rows are sliced off (the same as masking their logits to
    -inf). Without labels (logits wanted) the normal path runs.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear

    if not isinstance(model, GPTModel) or not isinstance(model.output_layer, ColumnParallelLinear):
        raise TypeError("install_fused_ce expects a megatron GPTModel with a ColumnParallelLinear output layer")

    class _FusedOutputLayer(type(model.output_layer)):
        def forward(self, input_, weight=None, runtime_gather_output=None):
            if getattr(self, "_cpt_defer", False):
                return _DeferredLogits(input_, self.weight if weight is None else weight), None
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)

    class _FusedCEGPTModel(type(model)):
        def forward(self, *args, labels=None, **kwargs):
            self.output_layer._cpt_defer = labels is not None
            try:
                return super().forward(*args, labels=labels, **kwargs)
            finally:
                self.output_layer._cpt_defer = False

        def compute_language_model_loss(self, labels, logits):
            if not isinstance(logits, _DeferredLogits):
                return super().compute_language_model_loss(labels, logits)
            s, b, hdim = logits.hidden.shape
            h = logits.hidden.reshape(s * b, hdim)
            y = labels.transpose(0, 1).reshape(-1)  # [b, s] -> [s*b], the order of h's rows
            w = logits.weight[: self._cpt_true_vocab]
            if self._cpt_ce_impl == "liger":
                loss = liger_linear_cross_entropy(h, w, y)
            else:
                loss = chunked_linear_cross_entropy(h, w, y, compiled=self._cpt_ce_impl == "compile")
            return loss.view(s, b).transpose(0, 1).contiguous()  # [b, s] like megatron

    model.output_layer.__class__ = _FusedOutputLayer
    model.__class__ = _FusedCEGPTModel
    model._cpt_ce_impl, model._cpt_true_vocab = impl, true_vocab


# ---------------------------------------------------------------------------------------------------
# RoPE: megatron's apply_rotary_pos_emb, compiled, for configs that ask for it (others untouched)


def install_rope(config) -> None:
    """Route this config's RoPE through a torch.compile'd copy of megatron's unfused bshd RoPE.

    megatron's attention module imports `apply_rotary_pos_emb` by name; we wrap that name once per
    process with a dispatcher that only diverts configs marked `_cpt_compiled_rope` (same math)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    config._cpt_compiled_rope = True
    if getattr(attention.apply_rotary_pos_emb, "_cpt_dispatch", False):
        return
    original = attention.apply_rotary_pos_emb
    fused = torch.compile(rope_utils._apply_rotary_pos_emb_bshd, dynamic=False)

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        if getattr(config, "_cpt_compiled_rope", False) and cu_seqlens is None and not config.apply_rope_fusion:
            return fused(t, freqs, rotary_interleaved=config.rotary_interleaved,
                         multi_latent_attention=config.multi_latent_attention, mscale=mscale)
        return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)

    apply_rotary_pos_emb._cpt_dispatch = True
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb


# ---------------------------------------------------------------------------------------------------
# torch.compile of each TransformerLayer


def compile_layers(model) -> int:
    """nn.Module.compile() on each TransformerLayer in place (state_dict names unchanged). Returns the count."""
    import torch._dynamo
    from megatron.core.transformer.transformer_layer import TransformerLayer

    # one compiled frame per layer instance: keep dynamo from falling back to eager after 8 layers
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    n = 0
    for m in model.modules():
        if isinstance(m, TransformerLayer):
            m.compile()
            n += 1
    return n
