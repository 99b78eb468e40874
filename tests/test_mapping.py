"""HF <-> megatron name map and value transforms (pure tensor code, no process group)."""

from __future__ import annotations

import torch

from cpt_megatron.checkpoint import mapping
from cpt_megatron.model.arch import ModelArch


def _arch(**kw):
    cfg = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5)
    cfg.update(kw)
    return ModelArch.from_hf_config(cfg)


def test_qkv_packing_is_grouped_and_invertible():
    arch = _arch()
    H, d, ng, r = 32, 4, 2, 4
    q, k, v = torch.randn(8 * d, H), torch.randn(ng * d, H), torch.randn(ng * d, H)
    qkv = mapping.pack_qkv(arch, q, k, v)
    assert qkv.shape == ((8 + 2 * ng) * d, H)
    # group g: its r query heads, then key head g, then value head g
    for g in range(ng):
        blk = qkv[g * (r + 2) * d:(g + 1) * (r + 2) * d]
        assert torch.equal(blk[: r * d], q[g * r * d:(g + 1) * r * d])
        assert torch.equal(blk[r * d:(r + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(blk[(r + 1) * d:], v[g * d:(g + 1) * d])
    q2, k2, v2 = mapping.unpack_qkv(arch, qkv)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    bias = [torch.randn(8 * d), torch.randn(ng * d), torch.randn(ng * d)]
    assert all(torch.equal(a, b) for a, b in zip(bias, mapping.unpack_qkv(arch, mapping.pack_qkv(arch, *bias))))


def test_every_hf_tensor_round_trips_through_its_megatron_tensor():
    for tied, model_type in ((False, "llama"), (True, "llama"), (False, "qwen2")):
        arch = _arch(tie_word_embeddings=tied, model_type=model_type)
        shapes = mapping.hf_shapes(arch)
        hf = {n: torch.randn(s) for n, s in shapes.items()}
        if tied:
            hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
        specs = mapping.megatron_specs(arch, padded_vocab=384)
        mc = {(s.key, s.layer): mapping.to_megatron(arch, s, hf.__getitem__, 384) for s in specs}
        for s in specs:
            assert tuple(mc[(s.key, s.layer)].shape) == s.shape, s
        assert mc[(mapping.EMBED_KEY, None)][300:].abs().sum() == 0  # padding rows are zeros
        for n in mapping.hf_names(arch):
            back = mapping.to_hf(arch, n, mc[mapping.hf_source(arch, n)])
            assert torch.equal(back, hf[n]), n
        assert (mapping.OUTPUT_KEY, None) not in mc if tied else (mapping.OUTPUT_KEY, None) in mc
        assert any(s.key.endswith("linear_qkv.bias") for s in specs) == (model_type == "qwen2")
