"""`cpt resize-embeddings`: grow a checkpoint's embeddings/output layer for an extended tokenizer."""

from __future__ import annotations

from cpt_megatron.cli._types import tokenizer_spec


def register(subparsers):
    p = subparsers.add_parser("resize-embeddings", parents=[subparsers.common],
                              help="grow embeddings (tied or untied output) for an extended tokenizer; never random")
    p.add_argument("--ckpt", required=True, help="checkpoint dir with cpt_meta.json and tokenizer/")
    p.add_argument("--tokenizer", type=tokenizer_spec, required=True, help="the NEW tokenizer (e.g. from `cpt tokenizer extend`)")
    p.add_argument("--out", required=True, help="output checkpoint dir")
    p.add_argument("--init", default="subtoken-mean", choices=["subtoken-mean", "mean"],
                   help="new rows: mean of the base sub-token rows (default) or the global mean")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.checkpoint.resize import resize_embeddings

    out = resize_embeddings(args.ckpt, args.tokenizer, args.out, init=args.init, overwrite=args.overwrite)
    print(f"resized vocab {out['old_vocab']} -> {out['new_vocab']} (padded {out['padded_vocab_size']}, "
          f"{out['new_tokens']} new rows, init {out['init']}) to {out['out']}", flush=True)
    return out
