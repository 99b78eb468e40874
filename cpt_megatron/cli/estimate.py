"""`cpt estimate`: compute, cost and per-GPU memory of a run before it burns GPU-hours."""

from __future__ import annotations

import argparse

from cpt_megatron import estimate as E
from cpt_megatron import flops as F
from cpt_megatron.cli._types import nonneg_float, positive_float, positive_int, token_count


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate",
        parents=[subparsers.common],
        help="FLOPs, GPU-hours, cost and memory per GPU for a training run",
        description="Estimate compute (6*N_dense*D + causal attention 6*L*s*a*d*D), GPU-hours, days, cost and "
        "memory per GPU (weights, grads, optimizer, activations) for a layout; with no --tp/--pp, find the "
        "smallest TP x PP that fits, preferring TP within a node.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help=f"preset: {', '.join(F.preset_names())}")
    model.add_argument("--hf-config", metavar="FILE", help="an HF config.json (or a model directory)")
    p.add_argument("--tokens", type=token_count, required=True, help="training tokens, e.g. 100e9")
    p.add_argument("--gpus", type=positive_int, required=True, help="total GPUs")
    p.add_argument("--gpu", default="h100", help=f"GPU type: {', '.join(F.GPUS)} (default h100)")
    p.add_argument("--tp", type=positive_int, help="tensor parallel size (omit --tp and --pp to search)")
    p.add_argument("--pp", type=positive_int, help="pipeline parallel size")
    p.add_argument("--cp", type=positive_int, default=1, help="context parallel size (default 1)")
    p.add_argument("--vp", type=positive_int, default=1, help="virtual pipeline stages per rank (default 1)")
    p.add_argument("--mbs", type=positive_int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--gbs", type=positive_int, help="global batch size in sequences (checks divisibility)")
    p.add_argument("--seq", type=positive_int, help="sequence length (default min(model max positions, 8192))")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--mfu", type=positive_float, help=f"model FLOPs utilization (default {E.DEFAULT_MFU})")
    rate.add_argument("--tflops-per-gpu", type=positive_float, help="achieved TFLOP/s per GPU (replaces --mfu)")
    p.add_argument("--price-per-gpu-hour", type=nonneg_float, help="price of one GPU-hour")
    p.add_argument("--currency", default="USD", help="currency code for the cost: USD, INR, EUR... (default USD)")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="shard fp32 master weights and Adam states over DP x CP (default on)")
    p.add_argument("--recompute", choices=E.RECOMPUTE_MODES, default="none", help="activation recomputation")
    p.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                   help="sequence parallelism (default: on when tp > 1)")
    p.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="attention never stores the s x s scores (TE/SDPA; default on)")
    p.add_argument("--attention-flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count the causal attention term; --no-attention-flops gives plain 6ND")
    p.add_argument("--headroom", type=nonneg_float, default=E.DEFAULT_HEADROOM,
                   help="fraction of GPU memory kept free for CUDA context, NCCL, fragmentation (default 0.1)")
    p.set_defaults(func=run)


def _si(x: float) -> str:
    return f"{x:.3e}"


def run(args: argparse.Namespace) -> dict:
    arch = F.preset(args.model) if args.model else F.load_hf_config(args.hf_config)
    r = E.estimate(
        arch, tokens=args.tokens, gpus=args.gpus, gpu=args.gpu, seq_len=args.seq, tp=args.tp, pp=args.pp,
        cp=args.cp, vp=args.vp, mbs=args.mbs, gbs=args.gbs, sp=args.sp, mfu=args.mfu,
        tflops_per_gpu=args.tflops_per_gpu, price_per_gpu_hour=args.price_per_gpu_hour, currency=args.currency,
        distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
        flash_attention=args.flash_attention, attention_flops=args.attention_flops, headroom=args.headroom,
    )
    ly, mem = r["layout"], r["memory"]
    lines = [
        f"model      {r['model']}: {r['params'] / 1e9:.2f}B params, seq {r['seq_len']}, {r['tokens']:.3g} tokens",
        f"compute    {_si(r['flops'])} FLOPs ({'6*N_dense*D + causal attention' if r['attention_flops'] else '6ND'}; "
        f"6ND alone {_si(r['flops_6nd'])})",
        f"rate       {r['tflops_per_gpu']} TFLOP/s per {r['gpu']} (MFU {r['mfu']:.0%})",
        f"time       {r['gpu_hours']:,.0f} GPU-hours = {r['days']:.1f} days on {r['gpus']} GPUs",
        "cost       " + (f"{r['currency_symbol']}{r['cost']:,.0f} ({r['currency']})" if r["cost"] is not None
                         else "pass --price-per-gpu-hour"),
        f"layout     tp {ly['tp']} pp {ly['pp']} cp {ly['cp']} dp {ly['dp']} vp {ly['vp']} mbs {ly['mbs']}"
        f" sp {'on' if ly['sp'] else 'off'}{' (searched)' if ly['searched'] else ''}, recompute {r['recompute']},"
        f" distributed optimizer {'on' if r['distributed_optimizer'] else 'off'}",
        f"memory     {mem['total']:.1f} GiB per GPU ({r['worst_stage']} stage): weights {mem['weights']:.1f} +"
        f" grads {mem['grads']:.1f} + optimizer {mem['optimizer']:.1f} + activations {mem['activations']:.1f}",
        f"fits       {'yes' if r['fits'] else 'NO'}: {mem['total']:.1f} of {r['usable_memory_gb']:.1f} usable GiB"
        f" ({r['gpu_memory_gb']:g} GiB less {args.headroom:.0%} headroom)",
    ]
    lines += [f"note       {n}" for n in r["notes"]]
    print("\n".join(lines))
    return r
