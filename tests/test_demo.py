"""Issue 28 items 1, 2, 8: the demo's steps on small fixtures (no model is trained here; the reduced end-to-end
demo is tests/test_real_model.py::test_demo_pipeline_reduced) and `cpt train`'s run-dir guard."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpt_megatron import demo
from cpt_megatron.config import load_recipe, to_dict
from cpt_megatron.errors import CptError

REPO = Path(__file__).resolve().parents[1]


def _curated_source(root: Path, name: str, texts: list[str]) -> dict:
    """A prepared source as `cpt prepare` leaves a FILE input: curated shards, no raw/ folder."""
    src = root / name
    (src / "curated").mkdir(parents=True)
    with gzip.open(src / "curated" / "shard-00000.jsonl.gz", "wt") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    return {"name": name, "group": "domain", "prefix": str(src / "tokens")}


def test_analyze_reads_curated_text_of_file_inputs(tmp_path, gpt2_tokenizer_dir, capsys):
    """Item 1: `make demo DOMAIN=medical` failed here (`give at least one --input file`): only @ inputs had raw/."""
    prepared = {"tokenizer": str(gpt2_tokenizer_dir), "sources": [
        _curated_source(tmp_path / "cache", "medquad", ["Question: What is (are) Glaucoma?\nAnswer: an eye disease."] * 30),
        {"name": "tokens_only", "group": "general", "prefix": str(tmp_path / "cache" / "pre" / "tokens")}]}
    summary = {"artifacts": {}}
    demo._analyze(prepared, tmp_path / "out", summary)
    line = capsys.readouterr().out
    assert "[   analyze] medquad fertility" in line and "tokens_only" not in line
    assert Path(summary["artifacts"]["tokenizer_report"]).is_file()


def test_each_demo_recipe_has_its_own_folder():
    """Item 2: both demos wrote runs/demo, and the second reused the first's run."""
    assert demo.default_out("demo") == "runs/demo" and demo.default_out("demo_medical") == "runs/demo_medical"
    assert load_recipe("demo").run.dir != load_recipe("demo_medical").run.dir
    make = subprocess.run(["make", "-n", "-o", "setup", "-o", ".venv/bin/cpt", "demo", "DOMAIN=medical"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert "--recipe demo_medical" in make and not re.search(r"runs/demo(?!_medical)\b", make), make


def test_demo_refuses_a_folder_holding_another_recipes_demo(tmp_path):
    """Item 2: one line, and neither summary.json nor the run's config.yaml is rewritten."""
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    summary = out / "summary.json"
    summary.write_text(json.dumps({"recipe": "demo", "artifacts": {}}))
    with pytest.raises(CptError, match=r"holds the demo of recipe 'demo', not 'demo_medical'.*runs/demo_medical"):
        demo.run_demo(str(out), "demo_medical")
    assert json.loads(summary.read_text())["recipe"] == "demo"
    # a run left by an earlier version (no recipe in summary.json): its config.yaml tells
    summary.unlink()
    cfg_yaml = out / "run" / "config.yaml"
    cfg_yaml.write_text(yaml.safe_dump(to_dict(load_recipe("demo", [f"run.dir={out / 'run'}"]))))
    before = cfg_yaml.read_bytes()
    with pytest.raises(CptError, match="holds another recipe's run"):
        demo.run_demo(str(out), "demo_medical")
    assert cfg_yaml.read_bytes() == before and not summary.exists()


def test_check_run_dir_same_run_may_change_knobs_not_data(tmp_path):
    from cpt_megatron.train.checks import check_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_recipe("demo", [f"run.dir={run}"]))))
    check_run_dir(load_recipe("demo", [f"run.dir={run}", "train.max_steps=24", "optim.lr=3e-4"]))  # a resume
    with pytest.raises(CptError, match=f"run.dir {run} holds another recipe's run"):
        check_run_dir(load_recipe("demo_medical", [f"run.dir={run}"]))
    with pytest.raises(CptError, match="holds another recipe's run"):
        check_run_dir(load_recipe("demo", [f"run.dir={run}", "model.gguf=/other.gguf"]))


def _fake_run(run: Path, general_change: dict[int, float], act: float = 0.05) -> Path:
    """A run dir as `cpt train` leaves it: config.yaml (monitor act), evals at 0/6/12, metrics, two checkpoints."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"monitor": {"warn": 0.02, "act": act}}}))
    rows = [{"step": 0, "results": {"med": {"group": "domain", "ppl": 10.0}, "wiki": {"group": "general", "ppl": 20.0}}}]
    for step, g in general_change.items():
        rows.append({"step": step, "results": {"med": {"group": "domain", "ppl": 10.0 - step / 4},
                                               "wiki": {"group": "general", "ppl": 20.0 * (1 + g)}}})
        ck = run / "checkpoints" / f"iter_{step:07d}"
        ck.mkdir()
        (ck / "weights.bin").write_bytes(b"\0" * 1000 * step)
    (run / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 - s / 10, "lr": 1e-4}) + "\n"
                                               for s in range(1, 13)))
    return run


def test_select_uses_the_runs_own_general_limit_not_100_percent(tmp_path, capsys):
    """Item 8: selection.png/.md drew the general limit at +100% (the demo passed 1.0)."""
    run = _fake_run(tmp_path / "run", {6: 0.01, 12: 0.03})
    assert demo._select(run) == "iter_0000012"  # general +3% is within act 5%, and it gains most on the domain
    md = (run / "selection.md").read_text()
    assert "<= 5.0%" in md and "100.0%" not in md
    run2 = _fake_run(tmp_path / "run2", {6: 0.01, 12: 0.03}, act=0.02)
    assert demo._select(run2) == "iter_0000006" and "<= 2.0%" in (run2 / "selection.md").read_text()
    # nothing within the limit: the least regressed checkpoint, and the line says so
    run3 = _fake_run(tmp_path / "run3", {6: 0.08, 12: 0.12})
    assert demo._select(run3) == "iter_0000006"
    assert "no checkpoint keeps the general regression within +5.0%" in capsys.readouterr().out


def test_demo_writes_the_plots_cpt_plot_makes(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", {6: 0.01, 12: 0.03})
    summary = {"artifacts": {}}
    demo._plots(run, summary)
    assert {Path(p).name for p in summary["artifacts"]["plots"]} == {"loss.png", "evals.png"}
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in summary["artifacts"]["plots"])
    assert "[     plots] loss.png, evals.png" in capsys.readouterr().out


@pytest.mark.parametrize("exported,kept", [("iter_0000006", ["iter_0000006", "iter_0000012"]),
                                           ("iter_0000012", ["iter_0000012"])])
def test_demo_keeps_the_last_and_the_exported_checkpoint_only(tmp_path, capsys, exported, kept):
    run = _fake_run(tmp_path / "run", {4: 0.0, 6: 0.01, 12: 0.03})
    demo._prune(run, exported)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept
    line = capsys.readouterr().out
    assert f"kept {' + '.join(kept)}" in line and f"removed {3 - len(kept)} other checkpoint(s)" in line


def test_model_card_shows_group_shares_not_in_group_weights():
    """Item 8: the card said 'Data mixture: stdlib_code: 1.0, pydoc_prose: 1.0' for an alpha 0.7 run."""
    from cpt_megatron.checkpoint.hf_export import mixture_text

    mix = {"stdlib_code": {"group": "domain", "weight": 1.0, "tokens": None},
           "extra_code": {"group": "domain", "weight": 3.0, "tokens": None},
           "pydoc_prose": {"group": "general", "weight": 1.0, "tokens": None}}
    text = mixture_text(mix, 0.6)
    assert text.startswith("domain 0.60 (stdlib_code 0.15 (in-group weight 1.0), extra_code 0.45 (in-group weight 3.0))")
    assert "general 0.40 (pydoc_prose 0.40 (in-group weight 1.0))" in text


def test_checkpoint_training_meta_records_groups(tmp_path):
    from cpt_megatron.checkpoint.hf_export import model_card
    from cpt_megatron.train.checkpointing import _training_meta

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_recipe("demo", [f"run.dir={run}"]))))
    tr = _training_meta(run, {"train": {"step": 12}, "recipe": {"train.global_batch": 8, "data.seq_len": 256}})
    assert tr["mixture"]["stdlib_code"]["group"] == "domain" and tr["domain_share_alpha"] == 0.7

    class Arch:
        model_type, num_layers, hidden_size, vocab_size = "llama", 30, 576, 49152

    card = model_card({"training": tr}, Arch, "fp32")
    assert "- Data mixture: domain 0.70 (stdlib_code 0.70 (in-group weight 1.0)); general 0.30 (pydoc_prose 0.30" in card


def test_hf_loads_print_no_progress_bars(tmp_path, capfd):
    """Item 8: 'Loading weights' bars (transformers) around the demo's step lines."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_megatron.utils import hf_quiet

    cfg = AutoConfig.from_pretrained(REPO / "recipes" / "models" / "tiny_llama.json")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    capfd.readouterr()
    with hf_quiet():
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert "Loading weights" not in capfd.readouterr().err
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # outside: transformers' default (the bar) again
    assert "Loading weights" in capfd.readouterr().err


def test_checkpoint_reads_hide_torchs_shardedtensor_futurewarning(tmp_path):
    import warnings

    from cpt_megatron.checkpoint.layout import read_errors

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with read_errors(tmp_path):
            warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning, stacklevel=2)
        warnings.warn("something else", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something else"]


def test_model_config_raises_no_megatron_deprecation_warning():
    """megatron-core's default cuda_graph_scope='full' warns 'full scope is deprecated' on every model build
    (one of the lines around the demo's step lines); we pass its non-deprecated equivalent."""
    import warnings

    from cpt_megatron.model import ModelArch, ModelOptions, transformer_config
    from cpt_megatron.runtime import ParallelConfig

    arch = ModelArch.from_hf_config(json.loads((REPO / "recipes" / "models" / "tiny_llama.json").read_text()))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tc = transformer_config(arch, ParallelConfig(), ModelOptions(dtype="fp32"))
    assert tc.cuda_graph_scope == [] and not [str(w.message) for w in seen if "scope is deprecated" in str(w.message)]


def test_train_header_finished_rerun_and_other_recipes_run_dir(tmp_path, tiny_cpu_cache, capsys):
    """Item 6: the header read `global batch 8 seq (512 tokens/step)`; re-running a finished run exited 0 without a
    word; item 2: `cpt train` into another recipe's run.dir reused it and rewrote its config.yaml."""
    from conftest import _clean_env, cpt_prepare

    from cpt_megatron.cli import main

    run = tmp_path / "run"
    cpt_prepare(tiny_cpu_cache)
    cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", "tiny_cpu", f"run.dir={run}",
           f"data.cache_dir={tiny_cpu_cache}", "train.max_steps=1", "checkpoint.save_interval=1", "eval.interval=1",
           "eval.batches=1"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_clean_env(), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "global batch 8 x seq 64 (512 tokens/step)" in first.stdout, first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_clean_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"nothing to do: {run} already finished at step 1 of 1" in again.stdout and "train.max_steps" in again.stdout
    # item 6 (w34): a run that trains nothing reads no data: no checksum pass over it (nor a model build)
    assert "data: verified" in first.stdout and "data: verified" not in again.stdout, again.stdout
    config = (run / "config.yaml").read_bytes()
    rc = main(["train", "--recipe", "demo", f"run.dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"run.dir {run} holds another recipe's run" in err[0], err
    assert (run / "config.yaml").read_bytes() == config


def test_demo_steps_that_read_no_data_take_the_manifest_as_it_is(tmp_path, tiny_cpu_cache, monkeypatch):
    """`cpt demo --only generate` (select, export, train) re-ran `cpt prepare` in full (every prepared file and the
    base checkpoint checksummed) before a step that reads none of it: now the manifest is taken as it is (sizes),
    and prepared only when missing or stale. Steps that read the data still prepare."""
    from conftest import cpt_prepare

    from cpt_megatron.train import prepare as prep

    cpt_prepare(tiny_cpu_cache)
    cfg = load_recipe("tiny_cpu", [f"data.cache_dir={tiny_cpu_cache}", f"run.dir={tmp_path / 'run'}"])
    calls = []
    monkeypatch.setattr(prep, "prepare", lambda c: calls.append(c) or prep.load_prepared(c, "cpt prepare"))
    for only in ("generate", "select", "export", "train"):
        assert only in demo._READS_NO_DATA
    got = demo._prepare(cfg, lambda step: False, {"artifacts": {}}, reads_data=False)
    assert not calls and got["base"] and [s["name"] for s in got["sources"]] == ["stdlib", "pydoc"]
    demo._prepare(cfg, lambda step: False, {"artifacts": {}}, reads_data=True)
    assert len(calls) == 1  # analyze / mixture / a full run: prepared (and checked) as before
    stale = load_recipe("tiny_cpu", [f"data.cache_dir={tmp_path / 'empty'}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(CptError):  # no manifest there: prepared (the stub cannot, and says so)
        demo._prepare(stale, lambda step: False, {"artifacts": {}}, reads_data=False)
    assert len(calls) == 2
