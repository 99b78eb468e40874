"""`cpt tokenizer analyze|extend`: measure fertility side by side; add domain tokens to a BPE tokenizer."""

from __future__ import annotations

from cpt_megatron.cli._types import nonneg_int, positive_int, tokenizer_spec

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="analyze tokenizer fertility; extend a tokenizer with domain tokens")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="<analyze|extend>", required=True)

    a = sub.add_parser(
        "analyze",
        parents=[subparsers.common],
        help="chars/token, fertility, byte fallback, fragmented words per source and tokenizer",
        description="T: an HF tokenizer dir, a tokenizer.json, a SentencePiece .model, a GGUF file or an "
        "encoder.json+vocab.bpe dir. FLORES-style files (eng_Latn.devtest, hin_Deva.devtest) get a ratio to "
        "the reference language.",
    )
    a.add_argument("--tokenizer", "-t", action="append", required=True, help="tokenizer (repeat for columns)")
    a.add_argument("--input", "-i", nargs="+", required=True, help="text files (one source each)")
    a.add_argument("--out", "-o", help="folder for report.json, report.md and fertility.png")
    a.add_argument("--reference-lang", help="parallel reference language code (default: eng if an eng_* file is given)")
    a.add_argument("--max-chars", type=nonneg_int, default=2_000_000, help="read at most this many chars per file (0: all)")
    a.set_defaults(func=run_analyze)

    e = sub.add_parser(
        "extend",
        parents=[subparsers.common],
        help="add up to N domain tokens (appended BPE merges; old ids unchanged); saves an HF tokenizer dir",
    )
    e.add_argument("--tokenizer", "-t", type=tokenizer_spec, required=True, help="base tokenizer (byte-level BPE or SentencePiece BPE)")
    e.add_argument("--input", "-i", nargs="+", required=True, help="domain text files (.txt or .jsonl)")
    e.add_argument("--add", type=positive_int, required=True, help="maximum number of new tokens")
    e.add_argument("--out", "-o", required=True, help="output HF tokenizer folder")
    e.add_argument("--min-frequency", type=positive_int, default=3, help="stop when the best pair is rarer than this")
    e.add_argument("--max-chars", type=positive_int, help="read at most this many characters of domain text")
    e.add_argument("--scripts", help="comma list of Unicode script names (e.g. DEVANAGARI): learn only from "
                   "words in these scripts, so other text keeps its encoding")
    e.add_argument("--join-marks", choices=["auto", "yes", "no"], default="auto",
                   help="keep combining marks inside words in a byte-level pre-tokenizer (Indic scripts); "
                   "auto: when >5%% of domain letters are marks")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=run_extend)


def run_analyze(args) -> dict:
    from cpt_megatron.tokenizer.analyze import analyze

    rep = analyze(args.tokenizer, args.input, reference_lang=args.reference_lang,
                  max_chars=args.max_chars or None, out_dir=args.out)
    if not args.json:
        names = rep["tokenizers"]
        by = {(r["source"], r["tokenizer"]): r for r in rep["per_source"]}
        width = max(len(s) for s in rep["sources"] + ["source"])
        print(f"{'source':<{width}}  " + "  ".join(f"{n[:28]:>28}" for n in names))
        print(f"{'':<{width}}  " + "  ".join(f"{'fert  ch/tok  split4  ratio':>28}" for _ in names))
        for src in rep["sources"]:
            cells = []
            for n in names:
                r = by[(src, n)]
                ratio = f"{r['ratio_to_reference']:.2f}" if r["ratio_to_reference"] is not None else "-"
                unit = "c" if r["fertility_unit"] == "char" else ""
                cells.append(f"{r['fertility']:.2f}{unit}  {r['chars_per_token']:.2f}  "
                             f"{r['split4_word_share']:.3f}  {ratio:>5}".rjust(28))
            print(f"{src:<{width}}  " + "  ".join(cells))
        for f in rep.get("files", []):
            print(f"wrote {f}")
    return {
        "tokenizers": rep["tokenizers"],
        "reference_lang": rep["reference_lang"],
        "overall": rep["overall"],
        "per_source": [{k: v for k, v in r.items() if k != "most_fragmented"} for r in rep["per_source"]],
        "files": rep.get("files", []),
    }


def run_extend(args) -> dict:
    from cpt_megatron.tokenizer.extend import extend_tokenizer

    res = extend_tokenizer(
        args.tokenizer, args.input, args.add, args.out, min_frequency=args.min_frequency,
        max_chars=args.max_chars,
        scripts=tuple(s.strip() for s in args.scripts.split(",")) if args.scripts else None,
        join_marks={"auto": None, "yes": True, "no": False}[args.join_marks], overwrite=args.overwrite,
    )
    if not args.json:
        print(f"added {res.num_new_tokens} tokens ({res.num_merges_added} merges; vocab {res.base_vocab_size} -> "
              f"{res.vocab_size}); domain tokens {res.domain_tokens_before} -> {res.domain_tokens_after}; "
              f"stop: {res.stop_reason}; out {res.out_dir}")
        print("first new tokens: " + " | ".join(res.sample_new_tokens[:10]))
    return res.to_dict()
