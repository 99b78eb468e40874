"""`cpt export-hf`: megatron-core checkpoint (imported or trained, any layout) -> HF safetensors directory."""

from __future__ import annotations

from cpt_megatron.cli._types import byte_size, positive_float, tokenizer_spec


def register(subparsers):
    p = subparsers.add_parser("export-hf", parents=[subparsers.common],
                              help="export a megatron-core checkpoint to an HF directory (streaming, verified)")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: cpt import-hf output, RUN/checkpoints[/iter_N], or a Megatron-LM save root/iter folder")
    p.add_argument("--tokenizer", type=tokenizer_spec, default=None,
                   help="HF tokenizer dir (a Megatron-LM save whose args.tokenizer_model is not on this machine)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: the checkpoint's dtype")
    p.add_argument("--max-shard-size", type=byte_size, default="5GB",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the transformers-vs-megatron logit check of the exported directory")
    p.add_argument("--verify-tol", type=positive_float, default=None,
                   help="max |logit diff| allowed by the check "
                   "(default 1e-4 for tiny models with hidden x layers <= 4096, else 1e-3)")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.checkpoint.hf_export import export_hf

    out = export_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    overwrite=args.overwrite, verify=not args.no_verify, verify_tol=args.verify_tol,
                    tokenizer=args.tokenizer)
    v = out.get("verify")
    msg = f"exported {out['shards']} shard(s), {out['bytes'] / 1e6:.1f} MB {out['dtype']} to {out['out']}"
    if v:
        msg += f"; verify max|diff| {v['max_abs_diff']:.3g} top1 {v['top1_agreement']:.4f}"
    print(msg, flush=True)
    return out
