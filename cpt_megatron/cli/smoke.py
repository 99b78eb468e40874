"""`cpt smoke`: a few real training steps of a random model from an HF config in any TP/PP/DP layout."""

from __future__ import annotations

from cpt_megatron.cli._types import positive_float, positive_int


def register(subparsers):
    p = subparsers.add_parser("smoke", parents=[subparsers.common],
                              help="train a random model from an HF config for N steps (any TP/PP/DP layout)")
    p.add_argument("--hf-config", required=True, help="HF config.json (or its directory)")
    p.add_argument("--steps", type=positive_int, default=5, help="training steps (default 5)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size")
    p.add_argument("--vpp", type=positive_int, default=None, help="virtual pipeline stages per rank (pp > 1)")
    p.add_argument("--sp", action="store_true", help="sequence parallel (tp > 1)")
    p.add_argument("--distributed-optimizer", action="store_true", help="shard optimizer state over DP")
    p.add_argument("--seq-len", type=positive_int, default=32, help="tokens per sample (default 32)")
    p.add_argument("--global-batch", type=positive_int, default=8, help="samples per step (default 8)")
    p.add_argument("--micro-batch", type=positive_int, default=2, help="samples per forward pass (default 2)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=1234, help="init and data seed")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="parameter dtype (auto: the model options default)")
    p.add_argument("--regularizer", default="none", choices=["none", "ewc", "l2sp"],
                   help="anti-forgetting penalty anchored at the initial weights (train.ewc.kind); reports the penalty")
    p.add_argument("--lam", type=float, default=1.0, help="penalty weight for --regularizer (train.ewc.lam)")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="local processes to spawn with torchrun (default tp*pp when not under a launcher)")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.flops import load_hf_config
    from cpt_megatron.runtime.launch import relaunched

    load_hf_config(args.hf_config)  # a bad config fails here, not in every spawned process
    if relaunched(args.nproc, default=args.tp * args.pp):
        return None  # rank 0 of the children printed the results
    from cpt_megatron.runtime import ParallelConfig
    from cpt_megatron.train.smoke import run_smoke

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, sp=args.sp,
                              distributed_optimizer=args.distributed_optimizer)
    out = run_smoke(args.hf_config, steps=args.steps, parallel=parallel, seq_len=args.seq_len,
                    global_batch=args.global_batch, micro_batch=args.micro_batch, seed=args.seed, lr=args.lr,
                    dtype=args.dtype, regularizer=args.regularizer, lam=args.lam)
    return out if out.pop("rank") == 0 else None
