"""Issue 28 items 3 and 5: `cpt train --dry-run` refuses what the real run refuses (one rule list,
train/checks.py `recipe_problems`, on the model config it can find before anything is imported), prints the
layout and the memory of each pipeline stage, lists missing paths apart from rule violations; `@` shortcuts
work the same in recipes, overrides and `--tokenizer` flags (tokenizer/load.py `resolve_spec`)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import cli

from cpt_megatron.config import load_recipe
from cpt_megatron.errors import CptError


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def scratch(tmp_path) -> list[str]:
    return [f"run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/c"]


def test_demo_tp2_dry_run_refuses_what_training_refuses(smollm2_gguf, tmp_path, capsys):
    """The demo's model is a GGUF: its shape (3 KV heads) is read from the GGUF, so tp=2 fails in the dry run
    with the real run's own message (it said `recipe ok` before)."""
    from cpt_megatron.train.checks import check_recipe
    from cpt_megatron.train.dryrun import _gguf_arch

    overrides = ["parallel.tp=2", *scratch(tmp_path)]
    rc, out, err = cli(["train", "--recipe", "demo", *overrides, "--nproc", "2", "--dry-run"], capsys)
    line = one_error_line(err)
    assert rc == 2 and "tp=2 must divide num_key_value_heads=3" in line, line
    assert "model 134.5M parameters, 30 layers: 30 per pipeline stage (from the GGUF" in out, out
    assert "problem: tp=2 must divide num_key_value_heads=3" in out
    # the same rule, word for word, from the function the real run calls before training
    with pytest.raises(CptError, match="tp=2 must divide num_key_value_heads=3"):
        check_recipe(load_recipe("demo", overrides), 2, _gguf_arch(str(smollm2_gguf)))


@pytest.mark.parametrize("overrides,nproc,message", [
    (["parallel.pp=3"], 3, "parallel.pp=3 must divide num_hidden_layers=4 (every pipeline stage holds the same "
                           "number of layers); use a pp in [1, 2, 4]"),
    (["parallel.pp=2", "parallel.vpp=4", "eval.batches=2"], 2, "parallel.vpp=4 must divide the 2 layers per pipeline stage"),
    (["parallel.tp=2", "parallel.sp=true", "data.seq_len=65"], 2,
     "data.seq_len=65 must be divisible by parallel.tp=2 x cp with parallel.sp=true"),
    (["parallel.tp=4"], 4, "tp=4 must divide num_key_value_heads=2"),
    (["parallel.pp=2", "parallel.vpp=2", "eval.batches=2", "train.global_batch=6"], 2,
     "train.global_batch=6 gives 3 micro-batches per step (global_batch / (micro_batch*dp)); with parallel.vpp it "
     "must be a multiple of parallel.pp=2"),
    (["parallel.pp=2", "parallel.vpp=2"], 2, "eval.batches=1 must be a multiple of parallel.pp=2 with parallel.vpp"),
])
def test_split_rules_are_one_list_for_dry_run_and_training(overrides, nproc, message, tmp_path, capsys):
    """Each rule megatron-core would otherwise hit deep in the model build (an AssertionError in
    get_num_layers_to_build, a shape error in SP) is refused up front, by the dry run and by `check_recipe`."""
    from cpt_megatron.model.arch import load_hf_config
    from cpt_megatron.train.checks import check_recipe

    rc, out, err = cli(["train", "--recipe", "tiny_cpu", *overrides, *scratch(tmp_path), "--nproc", nproc,
                        "--dry-run"], capsys)
    assert rc == 2 and message in one_error_line(err), err
    arch = load_hf_config("recipes/models/tiny_llama.json")
    with pytest.raises(CptError, match="^" + re.escape(message)):
        check_recipe(load_recipe("tiny_cpu", overrides), nproc, arch)


def test_70b_dry_run_prints_layout_memory_per_stage_and_missing_paths(tmp_path, monkeypatch, capsys):
    """The README's `cpt train --recipe llama3_70b_legal --dry-run --nproc 128` on a machine without the
    checkpoint: the shape comes from recipes/models/llama3.1_70b.json, memory per stage equals `cpt estimate`
    for the same layout, and the missing paths are listed apart (exit 2, one error line)."""
    from cpt_megatron.estimate import estimate
    from cpt_megatron.model.arch import load_hf_config
    from cpt_megatron.train.prepare import resolve_path

    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(["train", "--recipe", "llama3_70b_legal", "--dry-run", "--nproc", "128"], capsys)
    assert rc == 2 and one_error_line(err).startswith("cpt train: error: recipe check failed: 10 path(s) missing: "
                                                      "model.base: ckpts/llama3.1-70b, data.sources[court_opinions]")
    assert "recipe NOT ok: 128 processes = tp 8 x pp 4 x dp 4 (vpp 5)" in out
    assert ("80 layers: 20 per pipeline stage, 4 per virtual stage (from recipes/models/llama3.1_70b.json, "
            "as model.base does not exist yet)") in out
    est = estimate(load_hf_config(resolve_path("recipes/models/llama3.1_70b.json")), tokens=100e9, gpus=128,
                   gpu="h100", tp=8, pp=4, vp=5, seq_len=8192, gbs=512, sp=True)
    assert est["worst_stage"] == "first" and est["memory_per_gpu_gb"] == 43.47
    assert "    first stage    43.5 GiB = weights 4.23 + grads 8.46 + optimizer 6.35 + activations 24.44" in out
    assert "    last stage " in out and "problem:" not in out
    missing = out[out.index("  missing (create these before training):"):].splitlines()[1:]
    assert missing[0] == "    model.base: ckpts/llama3.1-70b (create it with `cpt import-hf --hf HF_DIR --out ckpts/llama3.1-70b`)"
    assert len(missing) == 10 and all(".idx (run cpt preprocess)" in m for m in missing[1:7])
    assert [m.split(":")[0].strip() for m in missing[7:]] == [  # eval paths are missing paths too, not rule problems
        "eval.benchmark_data", "eval.general[pg19_test].path", "eval.general[tinyshakespeare].path"]
    rc, out, err = cli(["train", "--recipe", "llama3_70b_legal", "--dry-run", "--nproc", "128", "--json"], capsys)
    res = json.loads(out.strip().splitlines()[-1])
    assert rc == 2 and not res["ok"] and res["problems"] == [] and len(res["missing"]) == 10
    assert res["memory_per_stage_gb"]["first"] == est["memory"] and res["layers_per_virtual_stage"] == 4


# -- item 5: @ shortcuts ----------------------------------------------------------------------------------------
def test_at_shortcut_as_an_override(gpt2_tokenizer_dir, tmp_path, capsys):
    rc, out, err = cli(["train", "--recipe", "tiny_cpu", "--dry-run", "model.tokenizer=@gpt2", *scratch(tmp_path)],
                       capsys)
    assert rc == 0 and "recipe ok" in out and err == "", err
    rc, out, err = cli(["train", "--recipe", "tiny_cpu", "--dry-run", "model.tokenizer=@gpt3", *scratch(tmp_path)],
                       capsys)
    assert rc == 2 and "model.tokenizer: unknown tokenizer shortcut '@gpt3': use one of @gpt2, @smollm2 or a path" \
        in one_error_line(err)
    rc, out, err = cli(["train", "--recipe", "tiny_cpu", "--dry-run", "run.dir=`x"], capsys)
    assert rc == 2 and "override 'run.dir=`x': '`x' is not a YAML value" in one_error_line(err)


def test_at_shortcut_in_tokenizer_flags(gpt2_tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    from cpt_megatron.tokenizer.load import load_tokenizer, resolve_spec, tokenizer_info

    assert resolve_spec("@gpt2") == str(gpt2_tokenizer_dir)
    assert load_tokenizer("@gpt2").encode("Hello world") == [15496, 995]
    assert tokenizer_info("@gpt2").sha256  # the files behind the shortcut are hashed
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    rc, out, err = cli(["tokenizer", "analyze", "-t", "@gpt2", "-i", text, "--json"], capsys)
    assert rc == 0 and "not found" not in err, err
    with pytest.raises(CptError, match="unknown tokenizer shortcut '@nope'"):
        load_tokenizer("@nope")
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "Hello world"}) + "\n")
    rc, out, err = cli(["preprocess", "--input", src, "--tokenizer", "@gpt2", "--out", tmp_path / "d", "--no-progress",
                        "--json"], capsys)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["tokens"] == 2, err
    rc, out, err = cli(["preprocess", "--input", src, "--tokenizer", "@gpt5", "--out", tmp_path / "e"], capsys)
    assert rc == 2 and "--tokenizer: unknown tokenizer shortcut '@gpt5'" in err and "Traceback" not in err, err
