"""cpt estimate: the standard worked examples and known published layouts."""

from __future__ import annotations

import json

import pytest

from cpt_megatron import estimate as E
from cpt_megatron import flops as F
from cpt_megatron.cli import main


def test_8b_50b_tokens_a100_hours():
    r = E.estimate(F.preset("llama3-8b"), tokens=50e9, gpus=8, gpu="a100", tflops_per_gpu=300,
                   attention_flops=False, tp=1, pp=1, recompute="full")
    assert r["flops"] == pytest.approx(2.4e21, rel=0.01)
    assert r["gpu_hours"] == pytest.approx(2222, rel=0.01)
    assert r["days"] == pytest.approx(r["gpu_hours"] / 8 / 24)


def test_70b_100b_tokens_a100_hours():
    r = E.estimate(F.preset("llama3-70b"), tokens=100e9, gpus=1024, gpu="a100", tflops_per_gpu=300, seq_len=8192)
    # 6ND alone: 4.2e22 FLOPs -> ~39,000 GPU-hours; with the causal attention term at s=8192, ~42,000
    assert r["flops_6nd"] == pytest.approx(4.2e22, rel=0.01)
    assert r["gpu_hours_6nd"] == pytest.approx(39_000, rel=0.01)
    assert r["gpu_hours"] == pytest.approx(42_000, rel=0.02)


def test_cost_and_currency():
    r = E.estimate(F.preset("llama3-8b"), tokens=50e9, gpus=8, gpu="a100", tflops_per_gpu=300,
                   attention_flops=False, price_per_gpu_hour=180, currency="inr", tp=1, pp=1)
    assert r["cost"] == pytest.approx(r["gpu_hours"] * 180)
    assert r["currency_symbol"] == "₹"
    assert E.estimate(F.preset("llama3-8b"), tokens=1e9, gpus=8, gpu="a100")["cost"] is None


def test_llama31_70b_64_h100_tp4_pp4_cp2_fits():
    r = E.estimate(F.preset("llama3.1-70b"), tokens=1e9, gpus=64, gpu="h100", tp=4, pp=4, cp=2, seq_len=8192)
    assert r["fits"], r["memory"]
    assert r["layout"]["dp"] == 2


def test_70b_tp1_pp1_does_not_fit():
    r = E.estimate(F.preset("llama3-70b"), tokens=1e9, gpus=64, gpu="h100", tp=1, pp=1)
    assert not r["fits"]
    assert r["memory_per_gpu_gb"] > 80


def test_8b_tp1_distributed_optimizer_fits():
    m = F.preset("llama3-8b")
    r = E.estimate(m, tokens=1e9, gpus=8, gpu="h100", tp=1, pp=1, recompute="full", seq_len=8192)
    assert r["fits"], r["memory"]
    # weights + grads + sharded optimizer: 6 + 12/8 bytes per parameter
    assert r["memory"]["weights"] + r["memory"]["grads"] + r["memory"]["optimizer"] == pytest.approx(
        F.param_count(m) * 7.5 / 2**30, rel=0.02)
    no_do = E.estimate(m, tokens=1e9, gpus=8, gpu="h100", tp=1, pp=1, recompute="full", distributed_optimizer=False)
    assert not no_do["fits"]  # 18 bytes/param = 135 GiB


def test_recompute_and_sp_reduce_activations():
    m = F.preset("llama3-70b")
    ly = E.Layout(tp=8, pp=1, dp=1)
    acts = {rc: E.memory_per_gpu(m, ly, seq_len=4096, recompute=rc, flash_attention=False).activations
            for rc in E.RECOMPUTE_MODES}
    assert acts["none"] > acts["selective"] > acts["full"]
    with_sp = E.memory_per_gpu(m, E.Layout(tp=8, sp=True), seq_len=4096).activations
    assert with_sp < E.memory_per_gpu(m, ly, seq_len=4096).activations


def test_search_prefers_tp_within_node():
    r = E.estimate(F.preset("llama3-70b"), tokens=1e9, gpus=256, gpu="h100")
    ly = r["layout"]
    assert r["fits"] and ly["searched"]
    assert ly["tp"] == 8  # TP fills the node before any PP
    assert ly["tp"] * ly["pp"] * ly["dp"] == 256
    small = E.estimate(F.preset("llama3-8b"), tokens=1e9, gpus=8, gpu="h100", recompute="full")
    assert small["layout"]["tp"] == 1 and small["layout"]["pp"] == 1


def test_bad_layouts_explain():
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        E.estimate(F.preset("llama3-8b"), tokens=1e9, gpus=6, gpu="h100", tp=4)
    with pytest.raises(ValueError, match="tp=16 must divide"):
        E.estimate(F.preset("llama3-8b"), tokens=1e9, gpus=16, gpu="h100", tp=16)
    with pytest.raises(ValueError, match="mfu must be in"):
        E.estimate(F.preset("llama3-8b"), tokens=1e9, gpus=8, gpu="h100", mfu=45)


def test_cli_json(capsys, tmp_path):
    rc = main(["estimate", "--model", "llama3-70b", "--tokens", "100e9", "--gpus", "256", "--gpu", "h100",
               "--mfu", "0.45", "--price-per-gpu-hour", "2.0", "--json"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    for key in ("flops", "gpu_hours", "days", "cost", "memory_per_gpu_gb", "fits", "layout"):
        assert key in summary
    assert set(summary["layout"]) >= {"tp", "pp", "dp"}
    assert summary["cost"] == pytest.approx(summary["gpu_hours"] * 2.0)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(F.PRESETS["mistral-7b"]))
    assert main(["estimate", "--hf-config", str(cfg), "--tokens", "1e9", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"] == 7_241_732_096


def test_cli_error_is_one_line(capsys):
    assert main(["estimate", "--model", "nope", "--tokens", "1e9", "--gpus", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpt estimate: error: unknown model preset") and "\n" not in err
