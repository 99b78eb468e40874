"""flops.py: parameter counts against the published model sizes, the FLOPs formula, MFU, HF configs."""

from __future__ import annotations

import json

import pytest

from cpt_megatron import flops as F
from cpt_megatron.errors import CptError

# Exact parameter counts of the HF checkpoints (model cards / safetensors index totals).
PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_param_count_matches_published(name, count):
    assert F.param_count(F.preset(name)) == count


def test_train_flops_per_token_formula():
    m = F.preset("llama3-8b")
    s = 8192
    n_dense = F.param_count(m) - m.vocab_size * m.hidden_size - m.num_layers * 2 * m.hidden_size - m.hidden_size
    assert F.dense_matmul_params(m) == n_dense
    attention = 6 * m.num_layers * s * m.num_heads * m.head_dim
    assert F.train_flops_per_token(m, s) == pytest.approx(6 * n_dense + attention)
    assert F.train_flops_per_token(m, s, causal=False) == pytest.approx(6 * n_dense + 2 * attention)
    # the attention term is linear in s
    assert F.train_flops_per_token(m, 2 * s) - F.train_flops_per_token(m, s) == pytest.approx(attention)


def test_tied_head_is_still_a_matmul():
    m = F.preset("smollm2-135m")
    assert m.tied
    # tied: the one embedding matrix is counted once in N, and its matmul once in N_dense
    assert F.dense_matmul_params(m) == pytest.approx(F.param_count(m), rel=0.001)


def test_six_nd_worked_example():
    # 8B x 50B tokens = 2.4e21 FLOPs
    assert F.six_nd_flops(F.preset("llama3-8b"), 50e9) == pytest.approx(2.4e21, rel=0.01)


def test_peak_and_mfu():
    assert F.peak_flops("a100") == 312e12
    assert F.peak_flops("H100") == 989e12
    assert F.peak_flops("h200") == 989e12
    for gpu in ("l40s", "a10", "b200", "cpu"):
        assert F.peak_flops(gpu) > 0
    # 8 A100 at 1000 tokens/s each with 6*1e9*... : MFU = achieved / peak
    assert F.mfu(8 * 1000, 156e9, "a100", 8) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown GPU type 'v100'"):
        F.peak_flops("v100")


def test_padded_vocab():
    assert F.padded_vocab_size(128256, 1) == 128256
    assert F.padded_vocab_size(32000, 8) == 32768
    assert F.padded_vocab_size(49152, 3) == 49152


def test_hf_config_roundtrip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(F.PRESETS["qwen2-7b"]))
    m = F.load_hf_config(tmp_path)
    assert m.qkv_bias and m.num_kv_heads == 4 and m.head_dim == 128
    assert F.param_count(m) == PUBLISHED["qwen2-7b"]
    with pytest.raises(CptError, match="HF config not found"):
        F.load_hf_config(tmp_path / "nope")
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CptError, match="model_type None is not supported"):
        F.load_hf_config(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CptError, match="missing required key 'num_attention_heads'"):
        F.load_hf_config(tmp_path / "bad.json")


def test_one_hf_parser_for_training_and_estimates():
    """flops/estimate parse configs with model/arch.py: the same qkv-bias rule and the same refusals."""
    from cpt_megatron.model.arch import ModelArch

    qwen = ModelArch.from_hf_config({**F.PRESETS["qwen2-7b"], "model_type": "qwen2"})
    assert F.shape_from_hf_config(F.PRESETS["qwen2-7b"]).qkv_bias is qwen.qkv_bias is True
    with pytest.raises(CptError, match="attention_bias=true"):  # bias on q/k/v/o of a Llama: refused by both
        F.shape_from_hf_config({**F.PRESETS["llama3-8b"], "attention_bias": True})


def test_duck_typed_arch():
    class Arch:
        vocab_size, hidden_size, ffn_hidden_size, num_layers = 100, 64, 128, 2
        num_heads, num_kv_heads, head_dim, tied = 4, 2, 16, True

    assert F.param_count(Arch()) == 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 128) + 100 * 64 + 64
    with pytest.raises(ValueError, match="unknown model preset"):
        F.preset("gpt5")
