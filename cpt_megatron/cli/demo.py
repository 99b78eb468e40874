"""`cpt demo`: the whole pipeline on the embedded default (see cpt_megatron/demo.py)."""

from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("demo", parents=[subparsers.common], help="run the full CPT pipeline on real data, offline")
    p.add_argument("--out", default=None, help="output folder (default runs/<recipe>: runs/demo, runs/demo_medical); "
                   "a folder holding another recipe's demo is refused")
    p.add_argument("--recipe", default="demo", help="recipe: demo (code) or demo_medical (default demo)")
    p.add_argument("--only", default=None, help="print one step: curate|analyze|preprocess|mixture|import|train|"
                   "select|export|generate (plots follow train, pruning follows export; steps it depends on run first when not cached under data.cache_dir, "
                   "e.g. curate imports the base model for its tokenizer and tokenizes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda trains in bf16 (default cpu)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=4")
    p.set_defaults(func=run)


def run(args):
    from cpt_megatron.demo import run_demo

    return run_demo(args.out, args.recipe, args.overrides, args.only, args.device)
