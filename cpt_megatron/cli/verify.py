"""`cpt verify`: transformers vs megatron-core logits on the same batches, in any TP/PP layout."""

from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("verify", parents=[subparsers.common],
                              help="compare an HF model with a megatron checkpoint (max/mean |logit diff|, top-1, loss)")
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--ckpt", required=True, help="megatron-core checkpoint directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=None, help="a text file to take tokens from (default: random token ids)")
    p.add_argument("--tol", type=float, default=None, help="fail (exit 2) above this max |diff|; default 1e-4/1e-3")
    p.add_argument("--nproc", type=int, default=None, help="spawn this many local processes (tp*pp) with torchrun")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.runtime.launch import relaunched

    if relaunched(args.nproc):
        return None  # rank 0 of the children printed the results
    import torch

    from cpt_megatron.checkpoint.io import arch_from_ckpt
    from cpt_megatron.checkpoint.verify import check_parity, verify_checkpoint

    from cpt_megatron.checkpoint.layout import resolve

    args.ckpt = str(resolve(args.ckpt))  # save root / iteration folder / old layout -> the tensors' folder
    text = open(args.text).read(200_000) if args.text else None
    res = verify_checkpoint(args.hf, args.ckpt, tp=args.tp, pp=args.pp, vpp=args.vpp, batch=args.batch,
                            seq_len=args.seq_len, seed=args.seed, text=text)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ.get("RANK", 0))
    if rank != 0:
        return None
    print(f"tp{args.tp} pp{args.pp}: max|diff| {res['max_abs_diff']:.3g} mean {res['mean_abs_diff']:.3g} "
          f"top1 {res['top1_agreement']:.4f} loss hf {res['loss_hf']:.5f} mcore {res['loss_mcore']:.5f}", flush=True)
    check_parity(res, arch_from_ckpt(args.ckpt), tol=args.tol)
    return res
