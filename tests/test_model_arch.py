"""HF config -> ModelArch / TransformerConfig mapping per family, and the errors for unsupported configs."""

import pytest

from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import ModelArch, padded_vocab_size

BASE = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, hidden_act="silu")


def cfg(**kw):
    return {**BASE, **kw}


def test_llama3_with_rope_scaling():
    a = ModelArch.from_hf_config(cfg(model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert a.rope_scaling["factor"] == 8.0 and a.rope_theta == 500000.0
    assert a.num_kv_heads == 2 and a.head_dim == 16 and not a.qkv_bias and not a.tie_word_embeddings
    # llama3 scaling divides low frequencies by the factor: compare with transformers' own computation
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**cfg(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert (a.rope_inv_freq() - inv).abs().max() < 1e-9


def test_transformers5_rope_parameters_form():
    a = ModelArch.from_hf_config(cfg(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 12345.0}))
    assert a.rope_theta == 12345.0 and a.rope_scaling is None


def test_qwen2_has_qkv_bias_and_ignores_unused_sliding_window():
    a = ModelArch.from_hf_config(cfg(model_type="qwen2", sliding_window=4096, use_sliding_window=False))
    assert a.qkv_bias and a.sliding_window is None


def test_smollm2_tied_embeddings():
    a = ModelArch.from_hf_config(cfg(model_type="llama", tie_word_embeddings=True))
    assert a.tie_word_embeddings


def test_mistral_sliding_window_refused_only_when_it_binds():
    a = ModelArch.from_hf_config(cfg(model_type="mistral", sliding_window=256))
    a.check_seq_len(256)  # identical to full attention
    with pytest.raises(CptError, match="sliding-window"):
        a.check_seq_len(512)
    ModelArch.from_hf_config(cfg(model_type="mistral", sliding_window=None)).check_seq_len(4096)


@pytest.mark.parametrize("bad,match", [
    (dict(model_type="gpt2"), "supported: llama, mistral, qwen2"),
    (dict(model_type="llama", hidden_act="gelu"), "hidden_act"),
    (dict(model_type="llama", attention_bias=True), "attention_bias"),
    (dict(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(model_type="llama", num_key_value_heads=3), "multiple of num_key_value_heads"),
])
def test_unsupported_configs_have_clear_errors(bad, match):
    with pytest.raises(CptError, match=match):
        ModelArch.from_hf_config(cfg(**bad))


def test_missing_key_names_the_key():
    c = cfg(model_type="llama")
    del c["intermediate_size"]
    with pytest.raises(CptError, match="intermediate_size"):
        ModelArch.from_hf_config(c)


def test_vocab_padding_rule():
    assert padded_vocab_size(49152, tp=1) == 49152
    assert padded_vocab_size(50257, tp=1) == 50304
    assert padded_vocab_size(50257, tp=2) == 50432
    assert padded_vocab_size(128256, tp=8) == 129024


def test_tp_must_divide_kv_groups():
    a = ModelArch.from_hf_config(cfg(model_type="llama"))
    with pytest.raises(CptError, match="num_key_value_heads"):
        a.check_parallel(4)


def test_transformer_config_fields():
    import torch.nn.functional as F

    from cpt_megatron.model import ModelOptions, transformer_config
    from cpt_megatron.runtime import ParallelConfig

    a = ModelArch.from_hf_config(cfg(model_type="qwen2"))
    tc = transformer_config(a, ParallelConfig(), ModelOptions(dtype="fp32"))
    assert tc.gated_linear_unit and tc.activation_func is F.silu and tc.normalization == "RMSNorm"
    assert tc.add_qkv_bias and not tc.add_bias_linear and tc.num_query_groups == 2 and tc.kv_channels == 16
