"""Issue 33: `make preprocess` / `make prepare` prepare a user's own recipe (`cpt prepare`) or one corpus
(`cpt preprocess`) through slurm/prepare.sh, the script `sbatch` runs; without RECIPE or INPUT: one line.
make runs with `-o setup` and VENV pointing at the existing venv, so nothing is (re)installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent


def make(*args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if k not in ("RECIPE", "OVERRIDES", "INPUT", "TOKENIZER", "OUT",
                                                             "WORKERS", "CPT", "MAKEFLAGS", "RANK", "WORLD_SIZE")}
    return subprocess.run(["make", "--no-print-directory", "-o", "setup", "-o", f"{VENV}/bin/cpt", f"VENV={VENV}",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**keep, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("target", ["preprocess", "prepare"])
def test_make_preprocess_without_recipe_or_input_is_one_line(target):
    out = make(target)
    assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "RECIPE=" in lines[0] and "INPUT=" in lines[0], lines


def test_prepare_sh_without_recipe_or_input_is_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("RECIPE", "INPUT")}
    out = subprocess.run(["bash", "slurm/prepare.sh"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "RECIPE=" in out.stderr
    out = subprocess.run(["bash", "slurm/prepare.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**env, "INPUT": "a.jsonl"})
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "TOKENIZER=" in out.stderr


def test_make_preprocess_recipe_runs_exactly_cpt_prepare():
    """The command the target runs, with CPT standing in for the cpt executable (as slurm/common.sh allows)."""
    out = make("preprocess", "RECIPE=llama3_8b_medical", "OVERRIDES=data.cache_dir=/x train.max_steps=2", "WORKERS=3",
               "CPT=echo cpt")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == ("cpt prepare --recipe llama3_8b_medical --workers 3 "
                                                   "data.cache_dir=/x train.max_steps=2")
    out = make("prepare", "INPUT=a.jsonl b.jsonl", "TOKENIZER=tok", "OUT=data/x", "CPT=echo cpt")
    assert out.stdout.strip().splitlines()[-1] == "cpt preprocess --input a.jsonl b.jsonl --tokenizer tok --out data/x --workers 1"
    out = make("preprocess", "INPUT=gsm8k.jsonl", "TOKENIZER=tok", "OUT=x", "KEYS=question answer", "CPT=echo cpt")
    assert out.stdout.strip().splitlines()[-1] == ("cpt preprocess --input gsm8k.jsonl --tokenizer tok --out x --workers 1 "
                                                   "--json-keys question answer")


def test_make_preprocess_recipe_is_what_cpt_train_accepts(tiny_cpu_cache):
    """`make preprocess RECIPE=tiny_cpu` leaves the manifest `cpt train` checks first (load_prepared): here on the
    session's prepared cache (conftest tiny_cpu_cache), so the target's `cpt prepare` rechecks every hash."""
    from cpt_megatron.config import load_recipe
    from cpt_megatron.train.prepare import load_prepared, manifest_path

    ov = f"data.cache_dir={tiny_cpu_cache}"
    cfg = load_recipe("tiny_cpu", [ov])
    manifest = manifest_path(cfg)
    manifest.unlink()  # as if never prepared: the manifest is rewritten from the (hash-checked) cached files
    with pytest.raises(Exception, match="cpt prepare --recipe tiny_cpu"):
        load_prepared(cfg, "cpt prepare --recipe tiny_cpu")
    out = make("preprocess", "RECIPE=tiny_cpu", f"OVERRIDES={ov}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert manifest.is_file()
    prepared = load_prepared(cfg, "cpt prepare --recipe tiny_cpu")
    assert {s["name"] for s in prepared["sources"]} == {"stdlib", "pydoc"}


def test_make_preprocess_input_equals_cpt_preprocess(tmp_path, gpt2_tokenizer_dir):
    corpus = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for k, p in enumerate(corpus):
        p.write_text("".join(json.dumps({"text": f"document {k}.{i}: " + "some words here. " * (i % 7 + 1)}) + "\n"
                             for i in range(200)))
    ours = tmp_path / "make" / "x"
    out = make("preprocess", f"INPUT={corpus[0]} {corpus[1]}", f"TOKENIZER={gpt2_tokenizer_dir}", f"OUT={ours}",
               "WORKERS=2")
    assert out.returncode == 0, out.stderr[-3000:]
    ref = tmp_path / "cli" / "x"
    cli = subprocess.run([sys.executable, "-m", "cpt_megatron", "preprocess", "--input", *map(str, corpus),
                          "--tokenizer", str(gpt2_tokenizer_dir), "--out", str(ref)], capture_output=True, text=True,
                         cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    for ext in (".bin", ".idx"):
        a, b = Path(f"{ours}{ext}").read_bytes(), Path(f"{ref}{ext}").read_bytes()
        assert a == b and len(a) > 1000, ext
