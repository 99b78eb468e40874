"""Compute, cost and memory planning for a continued-pretraining run (`cpt estimate`).

Compute: FLOPs = tokens x `flops.train_flops_per_token` (6*N_dense + causal attention 6*L*s*a*d), or the
6ND rule of thumb with `attention_flops=False`. GPU-hours = FLOPs / (peak x MFU) / 3600.

Memory per GPU (GiB = 2^30 bytes, as nvidia-smi reports), on the most loaded pipeline stage, with bf16
mixed precision and Adam as Megatron runs it (Rajbhandari et al. 2020; Megatron distributed optimizer):
  weights     2 bytes/param (bf16)
  grads       4 bytes/param (fp32 main-grad buffer, kept whole even with the distributed optimizer)
  optimizer   12 bytes/param (fp32 master copy + Adam m and v), / (dp*cp) with the distributed optimizer
  -> the familiar 18 bytes/param, or 6 + 12/d with the distributed optimizer.
Params per GPU: ceil(L/pp) layers / tp, plus the padded embedding / tp on the first stage and the
output head / tp on the last (a tied head is duplicated on the last stage when pp > 1).

Activations per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", Table 2), bytes, with s the per-rank sequence (seq / cp), b the micro-batch,
h hidden, a heads, t tp:
  no recompute, no SP      s*b*h * (10 + 24/t + 5*a*s/(h*t))
  no recompute, SP         s*b*h/t * (34 + 5*a*s/h)
  selective recompute      the 5*a*s/h term (the s x s attention scores) is dropped
  full recompute           2*s*b*h (/t with SP) per layer, plus one layer's working set
The formula is for GPT-3 layers (4h GeLU MLP, MHA, dropout); for Llama layers it is an approximation
(SwiGLU stores more, GQA and no dropout store less). FlashAttention (TE, SDPA: the default here) never
materializes the s x s scores, so with it the 5*a*s/h term is dropped as under selective recompute.
The first pipeline stage holds min(pp, micro-batches) micro-batches in flight, times
(1 + (pp-1)/(pp*vp)) with the interleaved schedule; the last stage also holds the logits
(bf16 + fp32 for the loss: 6 bytes x s*b*V/t).

A layout fits when the total is at most (1 - headroom) of the GPU's memory; the headroom (default 10%)
stands for the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cpt_megatron import flops as F
from cpt_megatron.errors import CptError

__all__ = [
    "Layout",
    "MemoryBreakdown",
    "RECOMPUTE_MODES",
    "DEFAULT_MFU",
    "CURRENCY_SYMBOLS",
    "memory_per_gpu",
    "memory_per_stage",
    "find_layout",
    "estimate",
]

GIB = 1024**3
DEFAULT_MFU = 0.40
DEFAULT_HEADROOM = 0.10
RECOMPUTE_MODES = ("none", "selective", "full")
CURRENCY_SYMBOLS = {"USD": "$", "INR": "₹", "EUR": "€", "GBP": "£", "JPY": "¥", "CNY": "¥"}


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Parallel layout: tp x pp x cp x dp = GPUs."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B); 1 = plain 1F1B."""
    mbs: int = 1
    sp: bool = False
    """Sequence parallelism (only meaningful with tp > 1)."""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU on the most loaded pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    params_per_gpu: int
    stage: str
    """Which stage is the most loaded: 'first', 'last' or 'only' (pp = 1)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def gib(self) -> dict[str, float]:
        return {
            "weights": round(self.weights / GIB, 2),
            "grads": round(self.grads / GIB, 2),
            "optimizer": round(self.optimizer / GIB, 2),
            "activations": round(self.activations / GIB, 2),
            "total": round(self.total / GIB, 2),
        }


def _layer_activation_bytes(m: F.ModelShape, s: int, b: int, t: int, sp: bool, recompute: str, flash: bool) -> float:
    sbh = s * b * m.hidden_size
    a = m.num_heads
    scores = 0.0 if (flash or recompute != "none") else 5.0 * a * s / m.hidden_size
    if sp:
        working = sbh / t * (34 + scores)
    else:
        working = sbh * (10 + 24 / t + scores / t)
    if recompute == "full":
        return 2.0 * sbh / (t if sp else 1)
    return working


def memory_per_stage(
    arch: Any,
    layout: Layout,
    *,
    seq_len: int,
    recompute: str = "none",
    distributed_optimizer: bool = True,
    flash_attention: bool = True,
    num_microbatches: int | None = None,
) -> dict[str, MemoryBreakdown]:
    """Memory per GPU of each pipeline stage kind: {'only'} with pp = 1, else {'first', 'last'} (the middle
    stages hold less than either)."""
    m = F.as_shape(arch)
    if recompute not in RECOMPUTE_MODES:
        raise CptError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    t, p, c = layout.tp, layout.pp, layout.cp
    sp = layout.sp and t > 1
    s = seq_len // c
    layers = math.ceil(m.num_layers / p)
    layer_params = F.layer_params(m)
    vocab = F.padded_vocab_size(m.vocab_size, t)
    embed = vocab * m.hidden_size // t
    head = embed if (not m.tied or p > 1) else 0
    body = layers * layer_params // t

    per_layer = _layer_activation_bytes(m, s, layout.mbs, t, sp, recompute, flash_attention)
    working = _layer_activation_bytes(m, s, layout.mbs, t, sp, "none", flash_attention)
    extra = working if recompute == "full" else 0.0  # one layer recomputed at a time
    logits = 6.0 * s * layout.mbs * vocab / t

    in_flight = p if num_microbatches is None else max(1, min(p, num_microbatches))
    interleave = 1.0 + (p - 1) / (p * layout.vp) if layout.vp > 1 else 1.0
    stages = {}
    if p == 1:
        stages["only"] = (body + embed + head + m.hidden_size, layers * per_layer + extra + logits)
    else:
        stages["first"] = (body + embed, layers * per_layer * in_flight * interleave + extra)
        stages["last"] = (body + head + m.hidden_size, layers * per_layer + extra + logits)

    shard = layout.dp * c if distributed_optimizer else 1
    return {name: MemoryBreakdown(weights=2.0 * params, grads=4.0 * params, optimizer=12.0 * params / shard,
                                  activations=act, params_per_gpu=int(params), stage=name)
            for name, (params, act) in stages.items()}


def memory_per_gpu(arch: Any, layout: Layout, **kw) -> MemoryBreakdown:
    """Memory on the most loaded GPU for this layout (see the module docstring for the model); the keywords
    are `memory_per_stage`'s."""
    return max(memory_per_stage(arch, layout, **kw).values(), key=lambda mb: mb.total)


def _check_layout(m: F.ModelShape, layout: Layout, seq_len: int, gbs: int | None) -> list[str]:
    problems = []
    t, p = layout.tp, layout.pp
    if m.num_heads % t or m.num_kv_heads % t:
        problems.append(f"tp={t} must divide num_heads={m.num_heads} and num_kv_heads={m.num_kv_heads}")
    if layout.vp > 1 and m.num_layers % (p * layout.vp):
        problems.append(f"pp*vp={p * layout.vp} must divide num_layers={m.num_layers} with virtual stages")
    if layout.cp > 1 and seq_len % (2 * layout.cp):
        problems.append(f"seq={seq_len} must be a multiple of 2*cp={2 * layout.cp} (load-balanced causal CP)")
    if gbs is not None and gbs % (layout.mbs * layout.dp):
        problems.append(f"gbs={gbs} must be a multiple of mbs*dp={layout.mbs * layout.dp}")
    return problems


def _make_layout(gpus: int, tp: int, pp: int, cp: int, vp: int, mbs: int, sp: bool | None) -> Layout | None:
    if gpus % (tp * pp * cp):
        return None
    return Layout(tp=tp, pp=pp, cp=cp, dp=gpus // (tp * pp * cp), vp=vp, mbs=mbs, sp=(tp > 1) if sp is None else sp)


def find_layout(
    arch: Any,
    *,
    gpus: int,
    gpu: str,
    seq_len: int,
    cp: int = 1,
    vp: int = 1,
    mbs: int = 1,
    gbs: int | None = None,
    sp: bool | None = None,
    recompute: str = "none",
    distributed_optimizer: bool = True,
    flash_attention: bool = True,
    headroom: float = DEFAULT_HEADROOM,
) -> tuple[Layout, MemoryBreakdown, bool]:
    """The smallest tp x pp that fits, preferring tp (within one node) over pp at equal size.

    Returns (layout, memory, fits); when nothing fits, the valid layout with the least memory and False.
    """
    m = F.as_shape(arch)
    spec = F.gpu_spec(gpu)
    capacity = spec.memory_gib * GIB * (1 - headroom)
    tps = [t for t in (1, 2, 4, 8, 16) if t <= spec.gpus_per_node]
    candidates = []
    for t in tps:
        for p in range(1, m.num_layers + 1):
            layout = _make_layout(gpus, t, p, cp, vp, mbs, sp)
            if layout is None or _check_layout(m, layout, seq_len, gbs):
                continue
            candidates.append(layout)
    if not candidates:
        raise CptError(
            f"no valid layout for {gpus} GPUs (cp={cp}, vp={vp}, mbs={mbs}, gbs={gbs}); "
            "pick --gpus divisible by tp*pp*cp, or pass --tp/--pp explicitly"
        )
    candidates.sort(key=lambda ly: (ly.tp * ly.pp, -ly.tp))
    smallest = None
    for layout in candidates:
        nmb = None if gbs is None else gbs // (layout.mbs * layout.dp)
        mem = memory_per_gpu(
            m, layout, seq_len=seq_len, recompute=recompute, distributed_optimizer=distributed_optimizer,
            flash_attention=flash_attention, num_microbatches=nmb,
        )
        if mem.total <= capacity:
            return layout, mem, True
        if smallest is None or mem.total < smallest[1].total:
            smallest = (layout, mem)
    assert smallest is not None
    return smallest[0], smallest[1], False


def estimate(
    arch: Any,
    *,
    tokens: float,
    gpus: int,
    gpu: str,
    seq_len: int | None = None,
    tp: int | None = None,
    pp: int | None = None,
    cp: int = 1,
    vp: int = 1,
    mbs: int = 1,
    gbs: int | None = None,
    sp: bool | None = None,
    mfu: float | None = None,
    tflops_per_gpu: float | None = None,
    price_per_gpu_hour: float | None = None,
    currency: str = "USD",
    distributed_optimizer: bool = True,
    recompute: str = "none",
    flash_attention: bool = True,
    attention_flops: bool = True,
    headroom: float = DEFAULT_HEADROOM,
) -> dict[str, Any]:
    """Compute, time, cost and per-GPU memory for training `arch` on `tokens` tokens with `gpus` GPUs.

    seq_len defaults to min(max_position_embeddings, 8192). With neither tp nor pp given, the layout is
    searched (`find_layout`); otherwise missing ones default to 1. Returns a JSON-able dict.
    """
    m = F.as_shape(arch)
    spec = F.gpu_spec(gpu)
    _check_inputs(tokens, gpus, mfu, tflops_per_gpu, headroom)
    seq = seq_len or min(m.max_position_embeddings, 8192)
    compute = _compute(m, spec, tokens, seq, mfu, tflops_per_gpu, attention_flops, price_per_gpu_hour)
    mem_kw = dict(recompute=recompute, distributed_optimizer=distributed_optimizer, flash_attention=flash_attention)
    if tp is None and pp is None:
        layout, mem, fits = find_layout(m, gpus=gpus, gpu=gpu, seq_len=seq, cp=cp, vp=vp, mbs=mbs, gbs=gbs, sp=sp,
                                        headroom=headroom, **mem_kw)
    else:
        layout, mem, fits = _given_layout(m, spec, gpus, tp or 1, pp or 1, cp, vp, mbs, gbs, sp, seq, headroom, mem_kw)
    return {
        "model": m.name, "params": F.param_count(m), "tokens": tokens, "seq_len": seq, "gpu": spec.name, "gpus": gpus,
        **compute,
        "days": compute["gpu_hours"] / gpus / 24,
        "currency": currency.upper(), "currency_symbol": CURRENCY_SYMBOLS.get(currency.upper(), currency.upper() + " "),
        "memory_per_gpu_gb": round(mem.total / GIB, 2), "memory": mem.gib(), "params_per_gpu": mem.params_per_gpu,
        "worst_stage": mem.stage, "gpu_memory_gb": spec.memory_gib,
        "usable_memory_gb": round(spec.memory_gib * (1 - headroom), 2), "fits": bool(fits),
        "layout": {**asdict(layout), "searched": tp is None and pp is None},
        "recompute": recompute, "distributed_optimizer": distributed_optimizer,
        "notes": _notes(m, layout, fits),
    }


def _check_inputs(tokens, gpus, mfu, tflops_per_gpu, headroom) -> None:
    if tokens <= 0:
        raise CptError(f"tokens must be positive, got {tokens}")
    if gpus <= 0:
        raise CptError(f"gpus must be positive, got {gpus}")
    if mfu is not None and tflops_per_gpu is not None:
        raise CptError("give either mfu or tflops_per_gpu, not both")
    if mfu is not None and not 0 < mfu <= 1:
        raise CptError(f"mfu must be in (0, 1], got {mfu} (did you mean --mfu {mfu / 100:g}?)")
    if tflops_per_gpu is not None and tflops_per_gpu <= 0:
        raise CptError(f"tflops_per_gpu must be positive, got {tflops_per_gpu}")
    if not 0 <= headroom < 1:
        raise CptError(f"headroom must be in [0, 1), got {headroom}")


def _compute(m, spec, tokens, seq, mfu, tflops_per_gpu, attention_flops, price_per_gpu_hour) -> dict:
    """FLOPs of the run, the throughput assumed (MFU or TFLOP/s per GPU), GPU hours and cost."""
    per_token = F.train_flops_per_token(m, seq)
    flops_6nd = F.six_nd_flops(m, tokens)
    total = per_token * tokens if attention_flops else flops_6nd
    if tflops_per_gpu is not None:
        achieved = tflops_per_gpu * 1e12
        used_mfu = achieved / spec.peak_bf16_flops
    else:
        used_mfu = DEFAULT_MFU if mfu is None else mfu
        achieved = spec.peak_bf16_flops * used_mfu
    gpu_hours = total / achieved / 3600
    return {"flops": total, "flops_6nd": flops_6nd, "flops_per_token": per_token, "attention_flops": attention_flops,
            "mfu": round(used_mfu, 4), "tflops_per_gpu": round(achieved / 1e12, 1), "gpu_hours": gpu_hours,
            "gpu_hours_6nd": flops_6nd / achieved / 3600,
            "cost": None if price_per_gpu_hour is None else gpu_hours * price_per_gpu_hour}


def _given_layout(m, spec, gpus, t, p, cp, vp, mbs, gbs, sp, seq, headroom, mem_kw):
    """(layout, memory, fits) of an explicit tp/pp, after checking that it is valid."""
    layout = _make_layout(gpus, t, p, cp, vp, mbs, sp)
    if layout is None:
        raise CptError(f"gpus={gpus} is not divisible by tp*pp*cp={t * p * cp}")
    problems = _check_layout(m, layout, seq, gbs)
    if problems:
        raise CptError("invalid layout: " + "; ".join(problems))
    nmb = None if gbs is None else gbs // (layout.mbs * layout.dp)
    mem = memory_per_gpu(m, layout, seq_len=seq, num_microbatches=nmb, **mem_kw)
    return layout, mem, mem.total <= spec.memory_gib * GIB * (1 - headroom)


def _notes(m, layout, fits) -> list[str]:
    notes = []
    if m.num_layers % layout.pp:
        notes.append(
            f"num_layers={m.num_layers} is not divisible by pp={layout.pp}: uneven stages need "
            "num_layers_in_first/last_pipeline_stage; memory assumes ceil(L/pp) layers per stage"
        )
    if not fits:
        notes.append("does not fit: try --recompute selective|full, a larger --tp/--pp/--cp, or more GPUs")
    return notes
