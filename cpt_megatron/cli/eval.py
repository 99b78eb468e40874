"""`cpt eval`: per-source perplexity / bits per byte of an HF model or a megatron checkpoint (any TP/PP)."""

from __future__ import annotations

from cpt_megatron.cli._types import positive_int

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", parents=[subparsers.common],
                              help="perplexity and bits/byte per held-out file (HF model or megatron checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="megatron-core checkpoint directory (cpt import-hf / cpt train)")
    src.add_argument("--hf", help="HF model directory (transformers, fp32)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help=".txt (one document) or .jsonl (one document per line) files; source name = file stem")
    p.add_argument("--group", choices=("general", "domain"), default="general", help="group of the --data sources")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")
    p.add_argument("--seq-len", type=positive_int, default=512, help="window length in tokens (labels per window)")
    p.add_argument("--micro-batch", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="evaluate only the first N tokens of each file")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's / checkpoint's own)")
    p.add_argument("--choice", nargs="*", default=[], metavar="FILE",
                   help="multiple-choice JSONL benchmarks (HellaSwag/ARC/MMLU layouts; --hf only)")
    p.add_argument("--choice-limit", type=positive_int, default=None, help="fixed subset size per benchmark")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size (--ckpt)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size (--ckpt)")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="local processes to spawn with torchrun (--ckpt; default tp*pp when not under a launcher)")
    p.set_defaults(func=run)


def _print(res: dict) -> None:
    for name, r in res["results"].items():
        if "ppl" in r:
            bpb = "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
            print(f"{name:<24} {r['group']:<8} ppl {r['ppl']:10.4f}  loss {r['loss']:.5f}  tokens {r['tokens']:>8}  "
                  f"bits/byte {bpb}", flush=True)
        else:
            print(f"{name:<24} {r['group']:<8} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  n {r['n']}", flush=True)


def run(args) -> dict | None:
    from cpt_megatron.errors import CptError

    common = dict(seq_len=args.seq_len, micro_batch=args.micro_batch, max_tokens=args.max_tokens, group=args.group,
                  tokenizer=args.tokenizer, text_key=args.text_key)
    if args.hf:
        if args.nproc or args.tp > 1 or args.pp > 1:
            raise CptError("--tp/--pp/--nproc apply to --ckpt; --hf runs one transformers process")
        from cpt_megatron.eval.standalone import evaluate_hf

        res = evaluate_hf(args.hf, args.data, choice_files=args.choice, choice_limit=args.choice_limit, **common)
        _print(res)
        return res
    if args.choice:
        raise CptError("--choice is supported with --hf only for now")
    from cpt_megatron.runtime.launch import relaunched

    if relaunched(args.nproc, default=args.tp * args.pp):
        return None  # rank 0 of the children printed the results
    from cpt_megatron.eval.standalone import evaluate_checkpoint
    from cpt_megatron.train.engine import Engine, OptimConfig

    def make_eval_fn(chunks, parallel, *, seq_len, micro_batch):
        return Engine(chunks, parallel, OptimConfig(), seq_len=seq_len, micro_batch=micro_batch).eval_step

    res = evaluate_checkpoint(args.ckpt, args.data, make_eval_fn=make_eval_fn, tp=args.tp, pp=args.pp, **common)
    if res["rank"] != 0:
        return None
    _print(res)
    return res
