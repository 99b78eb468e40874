"""`cpt import-hf`: HF Llama-family checkpoint (or GGUF) -> megatron-core torch_dist checkpoint, verified."""

from __future__ import annotations

from cpt_megatron.cli._types import positive_float


def register(subparsers):
    p = subparsers.add_parser("import-hf", parents=[subparsers.common],
                              help="convert an HF checkpoint (or GGUF) to a megatron-core distributed checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF model directory (config.json + safetensors or pytorch_model*.bin)")
    src.add_argument("--gguf", help="a GGUF file (dequantized to fp32 with transformers first)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto = the source dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-verify", action="store_true", help="skip the transformers parity check")
    p.add_argument("--verify-tol", type=positive_float, default=None,
                   help="max |logit diff| allowed by the parity check "
                   "(default 1e-4 for tiny models with hidden x layers <= 4096, else 1e-3)")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.checkpoint.hf_import import import_hf

    out = import_hf(args.hf, args.out, gguf=args.gguf, dtype=args.dtype, overwrite=args.overwrite,
                    verify=not args.no_verify, verify_tol=args.verify_tol)
    v = out.get("verify")
    msg = f"imported {out['model_type']} ({out['num_layers']} layers, vocab {out['vocab_size']}->{out['padded_vocab_size']}" \
          f", {out['dtype']}) to {out['out']} in {out['seconds_convert']}s"
    if v:
        msg += f"; verify max|diff| {v['max_abs_diff']:.3g} top1 {v['top1_agreement']:.4f}"
    print(msg, flush=True)
    return out
