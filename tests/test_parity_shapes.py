"""Issue 28 item 9: HF <-> megatron fp32 logit parity across shapes and families the other tests do not use,
in TP2 x PP2, against the bound rounding gives rather than a flat 1e-6.

Both sides compute the same function in fp32 in a different operation order (fused QKV, TP-split reductions
then all-reduce, another attention kernel), so every dot product differs by rounding: relative ~u*sqrt(n)
per reduction (u = 2^-24), and the per-layer perturbations of the residual stream add up over L layers like
a random walk (sqrt(L)). The logits are a last dot product with the (un)embedding, so the difference scales
with their magnitude:

    max |logit_hf - logit_mcore|  <=  C * u * max|logit| * sqrt(L),   C = 32

Measured C (= diff / (u * max|logit| * sqrt(L))): 2.2-8.0 over these shapes (two seeds), 7.0 for the
hidden-64 test models on the CI machine (6.0e-7); C = 32 leaves 4x for BLAS/CPU variation. A flat 1e-6 (the
old claim) fails here: 1.22e-6 (hidden 256, 8 layers), 6.3e-6 (logits up to 4.6) in TP2 x PP2; TP1 x PP1 is
bit-exact (0) on all of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

U = 2.0**-24  # fp32 unit roundoff
C = 32.0

# name: (family, hidden, layers, heads, kv heads, ffn, vocab, init std)
SHAPES = {
    "llama3_h64x4": ("llama3", 64, 4, 4, 2, 160, 1000, 0.02),
    "llama3_h256x8": ("llama3", 256, 8, 8, 2, 704, 4000, 0.02),
    "qwen2_mha_h128x16": ("qwen2", 128, 16, 4, 4, 352, 2000, 0.02),
    "tied_h192x12": ("smollm2", 192, 12, 6, 2, 512, 3000, 0.02),
    "mistral_big_logits_h128x8": ("mistral", 128, 8, 4, 2, 352, 2000, 0.08),
}


def parity_bound(num_layers: int, max_abs_logit: float) -> float:
    return C * U * max_abs_logit * math.sqrt(num_layers)


def _make(name: str, root: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from cpt_megatron.checkpoint.hf_import import import_hf

    fam, h, layers, heads, kv, ffn, vocab, std = SHAPES[name]
    kw = dict(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256, bos_token_id=0,
              eos_token_id=0, initializer_range=std)
    cfg = {"llama3": lambda: LlamaConfig(**kw, rope_theta=500000.0),
           "mistral": lambda: MistralConfig(**kw, sliding_window=None),
           "qwen2": lambda: Qwen2Config(**kw, tie_word_embeddings=False),
           "smollm2": lambda: LlamaConfig(**kw, tie_word_embeddings=True)}[fam]()
    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / f"hf_{name}")
    import_hf(root / f"hf_{name}", root / f"mc_{name}", verify=False)


@pytest.mark.heavy  # ~3 min on 2 cores: five imports, one 4-rank launch
def test_parity_bound_across_shapes_tp2_pp2(tmp_path):
    for name in SHAPES:
        _make(name, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    job = {"root": str(tmp_path), "layout": [2, 2], "names": list(SHAPES)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           __file__, json.dumps(job)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x[len("RESULT "):]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert [r["name"] for r in results] == list(SHAPES)
    for r in results:
        bound = parity_bound(SHAPES[r["name"]][2], r["max_abs_logit"])
        print(f"{r['name']}: max|diff| {r['max_abs_diff']:.3g}, max|logit| {r['max_abs_logit']:.3g}, bound {bound:.3g}, "
              f"C measured {r['max_abs_diff'] / (U * r['max_abs_logit'] * math.sqrt(SHAPES[r['name']][2])):.1f}")
        assert r["max_abs_diff"] <= bound and r["top1_agreement"] == 1.0, (r, bound)


def _worker(job: dict) -> None:
    from cpt_megatron.checkpoint.io import arch_from_ckpt
    from cpt_megatron.checkpoint.verify import _batch, _hf_logits, verify_checkpoint
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed

    root, (tp, pp) = Path(job["root"]), job["layout"]
    init_distributed(ParallelConfig(tp=tp, pp=pp))
    try:
        for name in job["names"]:
            r = verify_checkpoint(root / f"hf_{name}", root / f"mc_{name}", tp=tp, pp=pp)
            if torch.distributed.get_rank() == 0:  # the HF logits of the same batch verify compared
                ck = root / f"mc_{name}"
                hf = _hf_logits(root / f"hf_{name}", _batch(arch_from_ckpt(ck), 2, 32, 0, None, ck), torch.float32)
                print("RESULT " + json.dumps({**r, "name": name, "max_abs_logit": float(hf.abs().max())}), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    _worker(json.loads(sys.argv[1]))
