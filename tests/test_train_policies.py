"""The driver executes the forgetting monitor's actions (stop, adapt, rollback). The monitor's decision logic
has its own unit tests (test_monitor.py); here a scripted monitor acts at step 4 to exercise the driver."""

from __future__ import annotations

import json

import pytest

from cpt_megatron.config import load_recipe
from cpt_megatron.eval import monitor as monitor_mod
from cpt_megatron.eval.monitor import Event


@pytest.fixture(scope="module")
def cache(tiny_cpu_cache):
    return tiny_cpu_cache  # the driver trains on prepared data only


def scripted(policy: str, params: dict):
    class Scripted:
        def __init__(self, cfg, baseline, **kw):
            self.cfg, self.acted = cfg, False

        def observe(self, step, results):
            if step != 4 or self.acted:
                return [Event(step=step, kind="ok", action=None, metric="ppl", source="pydoc", value=1.0, baseline=1.0,
                              regression=0.0, threshold=None)]
            self.acted = True  # the real monitor has a cooldown; act once
            return [Event(step=step, kind="act", action=policy, metric="ppl", source="pydoc", value=1.1, baseline=1.0,
                          regression=0.1, threshold=0.03, params=params)]

        def rollback_target(self, saved_steps):
            return 2 if 2 in saved_steps else None

        def note_rollback(self, step, target):
            self.rolled_back = (step, target)

        def state_dict(self):
            return {"acted": self.acted}

        def load_state_dict(self, state):
            self.acted = state["acted"]

    return Scripted


def run(tmp_path, cache, monkeypatch, policy, params, *extra):
    from cpt_megatron.train.driver import train

    monkeypatch.setattr(monitor_mod, "ForgettingMonitor", scripted(policy, params))
    cfg = load_recipe("tiny_cpu", [f"run.dir={tmp_path}/run", f"data.cache_dir={cache}",
                                   f"eval.monitor.policy={policy}", "checkpoint.save_interval=2", *extra])
    res = train(cfg)
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return res, events, metrics


def test_stop_policy_saves_and_stops(tmp_path, cache, monkeypatch):
    res, events, _ = run(tmp_path, cache, monkeypatch, "stop", {})
    assert res.last_step == 4 and "forgetting monitor stopped" in res.stopped
    assert any(e["action"] == "stop" for e in events)
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_adapt_policy_raises_replay_from_the_boundary(tmp_path, cache, monkeypatch):
    res, _, metrics = run(tmp_path, cache, monkeypatch, "adapt", {"alpha_delta": -0.5}, "train.global_batch=16")
    assert res.last_step == 8
    share = lambda m: m.get("mix/stdlib", 0.0)  # noqa: E731
    before = sum(share(m) for m in metrics[:4]) / 4
    after = sum(share(m) for m in metrics[4:]) / 4
    assert before == pytest.approx(0.7, abs=0.08) and after == pytest.approx(0.2, abs=0.08)
    state = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000008" / "train_state.json").read_text())
    assert state["train"]["phases"] and state["train"]["phases"][-1]["alpha"] == pytest.approx(0.2)


def test_rollback_policy_reloads_target_and_scales_lr(tmp_path, cache, monkeypatch):
    res, _, metrics = run(tmp_path, cache, monkeypatch, "rollback", {"lr_factor": 0.5})
    steps = [m["step"] for m in metrics]
    assert steps[:4] == [1, 2, 3, 4] and steps[4] == 3  # back to the step-2 checkpoint, then continue
    assert res.last_step == 8
    from cpt_megatron.train.schedule import ScheduleConfig, lr_at

    full = lr_at(2, ScheduleConfig(type="cosine", warmup=2), lr=1e-3, min_lr=1e-4, total_steps=8)
    assert metrics[4]["lr"] == pytest.approx(0.5 * full)


def test_nonfinite_gradients_skip_the_update_and_stop_after_max_skipped(tmp_path, cache, monkeypatch):
    """A NaN gradient (injected through the EWC/L2-SP grad hook slot) skips the update; weights stay finite."""
    import torch

    from cpt_megatron.train import driver
    from cpt_megatron.train.engine import Engine

    orig = Engine.train_step

    def poisoned(self, microbatches, grad_hook=None):
        def hook(engine):
            if grad_hook is not None:
                grad_hook(engine)
            p = next(engine.chunks[0].parameters())
            (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).fill_(float("nan"))
        return orig(self, microbatches, grad_hook=hook)

    monkeypatch.setattr(Engine, "train_step", poisoned)
    cfg = load_recipe("tiny_cpu", [f"run.dir={tmp_path}/run", f"data.cache_dir={cache}", "train.max_skipped=3"])
    res = driver.train(cfg)
    assert res.last_step == 3 and "3 consecutive non-finite" in res.stopped
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["skipped"] for m in metrics)
    from cpt_megatron.checkpoint import io  # the step-3 checkpoint holds the base weights, finite

    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000003"
    key = "embedding.word_embeddings.weight"
    with io.single_process_group():
        w = io.read_ckpt_tensor(ckpt, key, io.ckpt_tensor_keys(ckpt)[key], None)
    assert torch.isfinite(w).all()
