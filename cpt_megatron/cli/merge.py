"""`cpt merge`: (1-λ)·base + λ·ckpt, or the average of several checkpoints of a run (streamed, any layout)."""

from __future__ import annotations

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", parents=[subparsers.common],
                              help="interpolate base and CPT weights ((1-λ)·B + λ·C) or average a run's checkpoints")
    p.add_argument("--base", default=None, metavar="B", help="base checkpoint (λ=0 end); omit to average the --ckpt")
    p.add_argument("--ckpt", required=True, nargs="+", metavar="C",
                   help="checkpoint to interpolate toward (with --base), or two or more to average (without)")
    p.add_argument("--weight", default=None, metavar="λ", help="interpolation weight in [0, 1] (with --base)")
    p.add_argument("--out", required=True, help="output checkpoint dir (a model-only release checkpoint)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="output dtype (default: the widest of the inputs; fp32 when any input is fp32)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the tokenizer, for Megatron-LM checkpoints whose tokenizer is not on this machine")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> dict:
    from cpt_megatron.checkpoint.merge import merge_checkpoints

    out = merge_checkpoints(args.ckpt, args.out, base=args.base, weight=args.weight, dtype=args.dtype,
                            overwrite=args.overwrite, tokenizer=args.tokenizer)
    print(f"merged {len(out['inputs'])} checkpoints ({out['formula']}, {out['dtype']}, {out['tensors']} tensors, "
          f"{out['bytes'] / 2**20:.1f} MiB, {out['seconds']:.1f}s) to {out['out']}", flush=True)
    return out
