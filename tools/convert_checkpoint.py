#!/usr/bin/env python
"""Megatron-LM style entry to cpt-megatron's converters (same code as `cpt import-hf` / `cpt export-hf`).

    python tools/convert_checkpoint.py --model-type GPT --loader hf --saver mcore --load-dir HF --save-dir CKPT
    python tools/convert_checkpoint.py --model-type GPT --loader mcore --saver hf --load-dir CKPT --save-dir HF

Unlike Megatron-LM's tools/checkpoint/convert.py there are no --target-tensor/pipeline-parallel-size flags:
the torch_dist checkpoint is layout-free and loads under any TP/PP (resharding happens at load time).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="GPT", choices=["GPT"])
    ap.add_argument("--loader", required=True, choices=["hf", "llama_mistral", "gguf", "mcore", "core"])
    ap.add_argument("--saver", required=True, choices=["mcore", "core", "hf"])
    ap.add_argument("--load-dir", required=True)
    ap.add_argument("--save-dir", required=True)
    ap.add_argument("--bf16", action="store_true", help="write bf16 (default: keep the source dtype)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args(argv)
    from cpt_megatron.errors import CptError

    try:
        if args.loader in ("hf", "llama_mistral", "gguf") and args.saver in ("mcore", "core"):
            from cpt_megatron.checkpoint.hf_import import import_hf

            gguf = args.load_dir if args.loader == "gguf" else None
            out = import_hf(None if gguf else args.load_dir, args.save_dir, gguf=gguf,
                            dtype="bf16" if args.bf16 else "auto", overwrite=args.overwrite, verify=not args.no_verify)
        elif args.loader in ("mcore", "core") and args.saver == "hf":
            from cpt_megatron.checkpoint.hf_export import export_hf

            out = export_hf(args.load_dir, args.save_dir, dtype="bf16" if args.bf16 else None,
                            overwrite=args.overwrite, verify=not args.no_verify)
        else:
            ap.error(f"unsupported conversion {args.loader} -> {args.saver}")
    except CptError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
