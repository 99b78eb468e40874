"""`cpt preprocess`: curated JSONL(.gz) -> Megatron .bin/.idx (+ .meta.json)."""

from __future__ import annotations

import sys

from cpt_megatron.cli._types import positive_float, positive_int, tokenizer_spec

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        parents=[subparsers.common],
        help="tokenize JSONL(.gz) into Megatron .bin/.idx",
        description="Tokenize curated JSONL(.gz) into Megatron indexed datasets (PREFIX.bin/.idx/.meta.json). "
        "Resumable: rerunning the same command skips finished shards. Input is JSONL only (one {\"text\": ...} "
        "object per line); for raw text run `cpt curate -i FILE.txt -o DIR [--doc-separator REGEX]` first (a text "
        "file is one document unless --doc-separator splits it) and pass DIR/*.jsonl.gz here.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL or JSONL.gz files (not raw text: see above)")
    p.add_argument("--tokenizer", type=tokenizer_spec, required=True,
                   help="tokenizer path (HF dir, tokenizer.json, .model, .gguf) or @gpt2 / @smollm2")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix (PREFIX_<key> with several keys)")
    p.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes (output identical for any value)")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--keep-empty", action="store_true",
                   help="write empty documents (as Megatron's tools/preprocess_data.py does) instead of skipping them")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="fields to tokenize (default: text)")
    p.add_argument("--chunk-mb", type=positive_float, default=8.0, help="input MiB per shard (default 8)")
    p.add_argument("--no-fast", action="store_true", help="always encode with the HF tokenizer (no tiktoken)")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> dict:
    from cpt_megatron.data.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        out=args.out,
        workers=args.workers,
        append_eod=args.append_eod,
        keep_empty=args.keep_empty,
        json_keys=tuple(args.json_keys),
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        fast=not args.no_fast,
        progress=not args.no_progress,
        keep_shards=args.keep_shards,
    )
    summary = preprocess(cfg)
    if not args.json:
        for key, o in summary["outputs"].items():
            print(
                f"{key}: {o['documents']:,} docs, {o['tokens']:,} tokens ({o['dtype']}), "
                f"{o['empty_docs']:,} empty {'kept' if args.keep_empty else 'skipped'} -> {o['prefix']}.bin/.idx"
            )
        print(f"{summary['tokens_per_s']:,} tokens/s in {summary['seconds']} s, encoder: {summary['encoder']}",
              file=sys.stderr)
    return summary
