"""`cpt smoke`: a few real training steps of a random model from an HF config in any TP/PP/DP layout."""

from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("smoke", parents=[subparsers.common],
                              help="train a random model from an HF config for N steps (any TP/PP/DP layout)")
    p.add_argument("--hf-config", required=True, help="HF config.json (or its directory)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (pp > 1)")
    p.add_argument("--sp", action="store_true", help="sequence parallel (tp > 1)")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--nproc", type=int, default=None, help="spawn this many local processes with torchrun")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.runtime.launch import relaunched

    if relaunched(args.nproc):
        return None  # rank 0 of the children printed the results
    from cpt_megatron.runtime import ParallelConfig
    from cpt_megatron.train.smoke import run_smoke

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, sp=args.sp,
                              distributed_optimizer=args.distributed_optimizer)
    out = run_smoke(args.hf_config, steps=args.steps, parallel=parallel, seq_len=args.seq_len,
                    global_batch=args.global_batch, micro_batch=args.micro_batch, seed=args.seed, lr=args.lr,
                    dtype=args.dtype)
    return out if out.pop("rank") == 0 else None
