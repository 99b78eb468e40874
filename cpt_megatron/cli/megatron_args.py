"""`cpt megatron-args --ckpt DIR`: the `pretrain_gpt.py` model flags that rebuild a checkpoint's model."""

from __future__ import annotations

from cpt_megatron.cli._types import tokenizer_spec


def register(subparsers):
    p = subparsers.add_parser("megatron-args", parents=[subparsers.common],
                              help="print the Megatron-LM pretrain_gpt.py flags that load this checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint (save root or iter_*/release folder)")
    p.add_argument("--tokenizer", type=tokenizer_spec, default=None, help="tokenizer to name in --tokenizer-model (default: the checkpoint's)")
    p.set_defaults(func=run)


def run(args):

    from cpt_megatron.checkpoint import layout
    from cpt_megatron.checkpoint.io import read_meta, tokenizer_path
    from cpt_megatron.checkpoint.megatron_lm import flags_for_meta, format_flags

    folder = layout.resolve(args.ckpt)
    meta = read_meta(folder, args.tokenizer)
    tok = tokenizer_path(folder, meta)
    flags, notes = flags_for_meta(meta, load=folder.parent.resolve(), tokenizer_model=tok.resolve() if tok else None,
                                  release=folder.name == layout.RELEASE)
    if not args.json:
        print(format_flags(flags, notes), end="", flush=True)
    return {"ckpt": str(folder), "flags": flags, "command_line": " ".join(flags), "notes": notes}
