"""`cpt verify`: transformers vs megatron-core logits on the same batches, in any TP/PP layout."""

from __future__ import annotations

from cpt_megatron.cli._types import positive_float, positive_int


def register(subparsers):
    p = subparsers.add_parser("verify", parents=[subparsers.common],
                              help="compare an HF model with a megatron checkpoint (max/mean |logit diff|, top-1, loss)")
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--ckpt", required=True, help="megatron-core checkpoint directory")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size of the megatron side")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size of the megatron side")
    p.add_argument("--vpp", type=positive_int, default=None, help="virtual pipeline stages per rank (pp > 1)")
    p.add_argument("--batch", type=positive_int, default=2, help="sequences per comparison batch (default 2)")
    p.add_argument("--seq-len", type=positive_int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--text", default=None, help="a text file to take tokens from (default: random token ids)")
    p.add_argument("--tol", type=positive_float, default=None,
                   help="fail (exit 2) above this max |logit diff| "
                   "(default 1e-4 for tiny models with hidden x layers <= 4096, else 1e-3)")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="local processes to spawn with torchrun (default tp*pp when not under a launcher)")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.runtime.launch import relaunched
    from cpt_megatron.utils import read_text

    text = read_text(args.text, "--text", max_chars=200_000) if args.text else None  # checked before spawning
    if relaunched(args.nproc, default=args.tp * args.pp):
        return None  # rank 0 of the children printed the results
    import torch

    from cpt_megatron.checkpoint.io import arch_from_ckpt
    from cpt_megatron.checkpoint.layout import resolve
    from cpt_megatron.checkpoint.verify import check_parity, verify_checkpoint

    args.ckpt = str(resolve(args.ckpt))  # save root / iteration folder / old layout -> the tensors' folder
    res = verify_checkpoint(args.hf, args.ckpt, tp=args.tp, pp=args.pp, vpp=args.vpp, batch=args.batch,
                            seq_len=args.seq_len, seed=args.seed, text=text)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ.get("RANK", 0))
    if rank != 0:
        return None
    print(f"tp{args.tp} pp{args.pp}: max|diff| {res['max_abs_diff']:.3g} mean {res['mean_abs_diff']:.3g} "
          f"top1 {res['top1_agreement']:.4f} loss hf {res['loss_hf']:.5f} mcore {res['loss_mcore']:.5f}", flush=True)
    check_parity(res, arch_from_ckpt(args.ckpt), tol=args.tol)
    return res
