"""Every recipe under recipes/ composes, validates and passes `cpt train --dry-run`'s layout and memory checks.

The big-model recipes point at checkpoints and token files users create first; here the model shape comes
from the shipped HF config (recipes/models/*.json, no hub download) and the data prefixes are empty stub
files in a scratch directory, so the layout, step plan and memory estimate are checked for real.
"""

import json
import math
import re
from pathlib import Path

import pytest

from cpt_megatron.config import load_recipe
from cpt_megatron.errors import CptError
from cpt_megatron.train.dryrun import dry_run

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))

# SmolLM2-135M's shape (the GGUF's config; the Hindi recipe's base adds <= 8,000 tokens)
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152 + 8000,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0,
}

# recipe -> (model config, world size of its Slurm layout, (tp, pp, dp), GiB per GPU the recipe header states)
BIG = {
    "llama3_8b_medical": ("llama3.1_8b.json", 16, (2, 1, 8), 48.0),
    "mistral_7b_code": ("mistral_7b_v0.3.json", 16, (2, 1, 8), 43.0),
    "qwen2_7b_indic": ("qwen2_7b.json", 16, (2, 1, 8), 43.0),
    # the header's 43.5 GiB is `cpt estimate`'s first pipeline stage (interleaved, 5 virtual stages): the
    # dry run reports the same most loaded stage
    "llama3_70b_legal": ("llama3.1_70b.json", 128, (8, 4, 4), 43.5),
    "smollm2_135m_hindi": (None, 1, (1, 1, 1), None),
}


def _stub_paths(cfg, root: Path) -> None:
    """A one-document dataset at every data prefix and an empty file at every raw input the recipe names,
    under the scratch cwd (the dry run reads the .idx header and the token ids)."""
    import numpy as np

    from cpt_megatron.data.indexed import IndexWriter

    for s in cfg.data.sources:
        if s.prefix:
            prefix = Path(s.prefix) if Path(s.prefix).is_absolute() else root / s.prefix
            if not prefix.with_name(prefix.name + ".idx").exists():
                prefix.parent.mkdir(parents=True, exist_ok=True)
                w = IndexWriter(prefix, np.int32)
                w.add_document([1, 2, 3])
                w.finalize()
            continue
        for p in (i for i in s.inputs if not i.startswith("@")):
            f = Path(p) if Path(p).is_absolute() else root / p
            if not f.exists():
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text("")
    for g in cfg.eval.general:  # held-out general sets, and the benchmark files of eval.benchmarks
        f = Path(g.path) if Path(g.path).is_absolute() else root / g.path
        if not f.exists() and not (Path(__file__).resolve().parents[1] / g.path).exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("")
    if cfg.eval.benchmark_data:
        from cpt_megatron.eval.tasks import EVAL_SPLITS

        for b in cfg.eval.benchmarks:
            for split in EVAL_SPLITS:
                f = root / cfg.eval.benchmark_data / b.task / f"{split}.jsonl"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text("")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates(name, tmp_path, monkeypatch):
    overrides = []
    if name in BIG:
        model_json, world, layout, gib = BIG[name]
        if model_json is None:
            model_json = tmp_path / "smollm2_135m.json"
            model_json.write_text(json.dumps(SMOLLM2_135M))
        else:
            model_json = f"recipes/models/{model_json}"
        overrides = ["model.base=null", f"model.hf_config={model_json}"]
    cfg = load_recipe(name, overrides)
    work = tmp_path / "work"  # "../shared/data/x" inputs land in tmp_path/shared/data, never outside tmp_path
    work.mkdir()
    monkeypatch.chdir(work)
    _stub_paths(cfg, work)
    if name not in BIG:
        world, layout, gib = cfg.parallel.tp * cfg.parallel.pp, None, None
    out = dry_run(cfg, nproc=world)
    assert out["ok"] and out["steps"] >= 1
    if layout is not None:
        assert (out["tp"], out["pp"], out["dp"]) == layout
        assert out["world_size"] == world and out["micro_batches_per_step"] >= 1
    if cfg.train.tokens:
        assert out["steps"] == math.ceil(cfg.train.tokens / (cfg.train.global_batch * cfg.data.seq_len)), out["steps"]
    if gib is not None:
        assert out["fits"] and out["memory_per_gpu_gb"] == pytest.approx(gib, abs=0.5), out["memory_breakdown_gb"]


def test_big_recipe_without_its_base_names_the_import(tmp_path, monkeypatch):
    """Issue 28 item 3: a base not imported yet is a missing path (with the command that creates it), and the
    layout and memory still come from the shipped config its name matches (recipes/models/llama3.1_8b.json)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe("llama3_8b_medical")
    with pytest.raises(CptError, match=re.escape("9 path(s) missing: model.base: ckpts/llama3.1-8b, data.sources[pmc_oa].prefix: ")):
        dry_run(cfg, nproc=16)
    out = dry_run(cfg, nproc=16, strict=False)
    assert not out["ok"] and out["problems"] == [] and len(out["missing"]) == 1 + len(cfg.data.sources) + 3  # + eval paths
    assert out["missing"][0] == "model.base: ckpts/llama3.1-8b (create it with `cpt import-hf --hf HF_DIR --out ckpts/llama3.1-8b`)"
    assert out["model_source"].startswith("recipes/models/llama3.1_8b.json")
    assert out["memory_per_gpu_gb"] == pytest.approx(48.0, abs=0.5) and out["num_layers"] == 32


def test_dry_run_reports_layout_problems():
    cfg = load_recipe("tiny_cpu", ["parallel.tp=3"])
    with pytest.raises(CptError, match="tp=3 must divide"):
        dry_run(cfg, nproc=3)
