"""EWC / L2-SP (train/ewc.py) are the same regularizer in every layout and pull toward the anchor.

Regularized `cpt smoke` runs (tiny Llama, EWC lam=1 anchored at the init, Fisher from two replay micro-batches)
in TP2 (and, in `make test-all`, PP2, PP2+VPP2, TP2+SP, DP2 + distributed optimizer) equal TP1 at the standard
of test_parallel_layouts.py: losses within 1e-5, gradient norms and per-tensor updates, plus the global penalty
and the Fisher normaliser within 1e-4 relative, and TP-replicated tensors (norms) equal on both TP ranks.
"""

from __future__ import annotations

import pytest
from test_parallel_layouts import assert_same_step, smoke

REG = ["--regularizer", "ewc", "--lam", "1", "--steps", "3"]


@pytest.fixture(scope="module")
def reference():
    return smoke(*REG)


def assert_same_regularized_run(out: dict, ref: dict) -> None:
    assert max(abs(a - b) for a, b in zip(out["losses"], ref["losses"])) < 1e-5, (out["losses"], ref["losses"])
    assert out["fisher_normaliser"] == pytest.approx(ref["fisher_normaliser"], rel=1e-4)
    assert all(p > 0 for p in ref["penalties"])
    assert out["penalties"] == pytest.approx(ref["penalties"], rel=1e-4), (out["penalties"], ref["penalties"])
    assert out["tp_replica_diff"] == 0.0  # the same Fisher and penalty gradient on every TP rank's copy
    assert_same_step(out, ref)


LAYOUTS = {
    "tp2": (["--tp", "2"], 2),
    "pp2": (["--pp", "2"], 2),
    "pp2_vpp2": (["--pp", "2", "--vpp", "2"], 2),
    "tp2_sp": (["--tp", "2", "--sp"], 2),
    "dp2_distributed_optimizer": (["--distributed-optimizer"], 2),
}
HEAVY = {"pp2", "pp2_vpp2", "tp2_sp", "dp2_distributed_optimizer"}  # ~20 s each here: `make test-all`


@pytest.mark.parametrize("name", [n if n not in HEAVY else pytest.param(n, marks=pytest.mark.heavy) for n in LAYOUTS])
def test_regularized_layout_matches_tp1(name, reference):
    flags, nproc = LAYOUTS[name]
    assert_same_regularized_run(smoke(*REG, *flags, nproc=nproc), reference)


def test_penalty_pulls_toward_the_anchor(reference):
    """The penalty's gradient points back to the anchor: with lam=1 the weights end closer to it (smaller
    penalty per unit lam) than with a negligible lam. A flipped sign pushes them away and fails this."""
    free = smoke("--regularizer", "ewc", "--lam", "1e-6", "--steps", "3")
    assert free["fisher_normaliser"] == reference["fisher_normaliser"]  # same Fisher, only lam differs
    pulled, loose = reference["penalties"][-1] / 1.0, free["penalties"][-1] / 1e-6
    assert pulled < 0.5 * loose, (pulled, loose)


@pytest.mark.slow
@pytest.mark.heavy  # two tiny_cpu trainings, one of them 2-rank: `make test-all`
def test_cpt_train_ewc_tp2_matches_tp1(tmp_path, tiny_cpu_cache):
    """The driver's EWC (Fisher on the replay source's validation micro-batches, every rank the same) in TP2
    logs the same global `ewc_penalty` and losses as TP1."""
    import json

    from conftest import cpt_train

    ewc = ["train.ewc.kind=ewc", "train.ewc.lam=1", "train.ewc.batches=2", "train.max_steps=4"]
    out = {}
    for name, extra, nproc in (("tp1", [], 1), ("tp2", ["parallel.tp=2"], 2)):
        res = cpt_train(tmp_path / name, tiny_cpu_cache, *ewc, *extra, nproc=nproc)
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = (res["losses"], [m["ewc_penalty"] for m in metrics])
    (l1, p1), (l2, p2) = out["tp1"], out["tp2"]
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5, (l1, l2)
    assert p1[0] == 0 and all(p > 0 for p in p1[1:]), p1  # lr 0 at the first warmup step: still at the anchor
    assert p2 == pytest.approx(p1, rel=1e-4), (p1, p2)
