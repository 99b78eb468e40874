"""The run's state (train/state.py): one registry, saved once, read by resume and rollback alike.

Units: the registry, the monitor's and stability guard's state, the recipe-change line, prune_checkpoints.
Runs (tiny_cpu, in-process): an interrupted + resumed run with an ACTING monitor logs exactly what the
uninterrupted run logs; a rollback after a requeue, with async saves, reloads checkpoint k exactly (the re-run
steps equal the originals bit for bit) and the monitor remembers it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from cpt_megatron.checkpoint import layout
from cpt_megatron.config import load_recipe
from cpt_megatron.eval import monitor as monitor_mod
from cpt_megatron.eval.monitor import ForgettingMonitor, MonitorConfig
from cpt_megatron.train import checkpointing
from cpt_megatron.train.stability import StabilityGuard
from cpt_megatron.train.state import RecipeFingerprint, RunState, TrainState, legacy_train_state


# ---- units -------------------------------------------------------------------------------------------------
def test_registry_roundtrip_late_registration_and_skip():
    rs = RunState()
    train = rs.register("train", TrainState(phases=[]))
    guard = rs.register("stability", StabilityGuard(3, 2.0))
    train.step, train.consumed_samples, train.lr_scale = 7, 56, 0.5
    guard.observe(7, 2.5, skipped=True)
    saved = json.loads(json.dumps(rs.state_dict()))  # plain data: JSON-able
    assert saved["train"]["step"] == 7 and saved["stability"] == {"running": 2.5, "skipped_streak": 1}

    rs2 = RunState()
    t2 = rs2.register("train", TrainState())
    rs2.load_state_dict({**saved, "later": {"x": 1}})
    assert (t2.step, t2.consumed_samples, t2.lr_scale) == (7, 56, 0.5)

    class Later:
        def state_dict(self):
            return {"x": self.x}

        def load_state_dict(self, s):
            self.x = s["x"]

    assert rs2.register("later", Later()).x == 1  # a component registered after the load gets its state
    t2.step = 99
    rs2.load_state_dict(saved, skip=("train",))
    assert t2.step == 99
    with pytest.raises(TypeError, match="no state_dict"):
        rs2.register("bad", object())
    assert legacy_train_state({"step": 4, "consumed_samples": 32, "phases": [], "lr_scale": 1.0, "baseline": None,
                               "train": {"tokens_per_step": 512}})["train"]["step"] == 4


def test_recipe_change_named_in_one_line():
    cfg = load_recipe("tiny_cpu", [])
    saved = RecipeFingerprint(cfg, 8).state_dict()
    same = RecipeFingerprint(load_recipe("tiny_cpu", []), 8)
    same.load_state_dict(saved)
    assert same.changes(4) is None
    new = RecipeFingerprint(load_recipe("tiny_cpu", ["data.alpha=0.5"]), 8)
    new.load_state_dict(saved)
    line = new.changes(4)
    assert "\n" not in line and "data.alpha 0.7 -> 0.5" in line and "from step 5" in line


def test_regularizer_switched_on_resume_is_named():
    """none -> ewc (and a changed lambda) between checkpoint and resume: the recipe-change line names it (the
    regularizer's own state is absent from a run that had none, so nothing was said before)."""
    saved = RecipeFingerprint(load_recipe("tiny_cpu", []), 8).state_dict()
    new = RecipeFingerprint(load_recipe("tiny_cpu", ["train.ewc.kind=ewc", "train.ewc.lam=1"]), 8)
    new.load_state_dict(json.loads(json.dumps(saved)))
    line = new.changes(4)
    assert "\n" not in line and "train.ewc.kind 'none' -> 'ewc'" in line and "train.ewc.lam 0.0 -> 1" in line, line
    back = RecipeFingerprint(load_recipe("tiny_cpu", []), 8)
    back.load_state_dict(new.state_dict())
    assert "train.ewc.kind 'ewc' -> 'none'" in back.changes(4)
    old = RecipeFingerprint(load_recipe("tiny_cpu", ["train.ewc.kind=l2sp"]), 8)
    old.load_state_dict({k: v for k, v in saved.items() if not k.startswith("train.ewc")})  # an older checkpoint
    assert old.changes(4) is None


BASE = {"wiki": {"group": "general", "ppl": 10.0}, "med": {"group": "domain", "ppl": 20.0}}


def _res(wiki):
    return {"wiki": {"group": "general", "ppl": wiki}, "med": {"group": "domain", "ppl": 15.0}}


def test_monitor_state_roundtrip_decides_as_uninterrupted():
    cfg = MonitorConfig(policy="adapt", cooldown_evals=2, max_actions=2)
    seq = [(s, _res(11.0 if s >= 20 else 10.0)) for s in range(10, 110, 10)]
    whole = ForgettingMonitor(cfg, BASE)
    ref = [[e.to_dict() for e in whole.observe(s, r)] for s, r in seq]
    for cut in range(1, len(seq)):
        m = ForgettingMonitor(cfg, BASE)
        got = [[e.to_dict() for e in m.observe(s, r)] for s, r in seq[:cut]]
        resumed = ForgettingMonitor(cfg, BASE)
        resumed.load_state_dict(json.loads(json.dumps(m.state_dict())))
        got += [[e.to_dict() for e in resumed.observe(s, r)] for s, r in seq[cut:]]
        assert got == ref, cut


def test_monitor_remembers_rollback():
    m = ForgettingMonitor(MonitorConfig(policy="rollback"), BASE)
    for s, v in ((10, 10.0), (20, 10.0), (30, 10.5)):
        m.observe(s, _res(v))
    assert m.rollback_target([10, 20, 30]) == 20
    m.note_rollback(30, 20)
    assert m.worst_regression(30) is None  # the abandoned evaluation is forgotten
    assert m.rollback_target([10, 20]) == 10  # never back to the same point
    m2 = ForgettingMonitor(MonitorConfig(policy="rollback"), BASE)
    m2.load_state_dict(m.state_dict())
    assert m2.rollbacks == [{"step": 30, "to": 20}] and m2.rollback_target([10, 20]) == 10


# ---- prune_checkpoints -------------------------------------------------------------------------------------
def _fake_ckpt(root, step):
    d = root / layout.iter_name(step)
    d.mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    (d / "common.pt").write_bytes(b"x" * 64)
    (d / "__0_0.distcp").write_bytes(b"y" * 256)
    layout.write_manifest(d)
    return d


def _complete(root):
    return {p.name: checkpointing._problem(p) for p in layout.iteration_folders(root)}


def test_prune_keeps_last_milestones_best_and_rollback_target(tmp_path):
    root = tmp_path / "checkpoints"
    for s in range(1, 9):
        _fake_ckpt(root, s)
    inflight = root / ".iter_0000009.tmp"  # an async save still being written
    inflight.mkdir()
    (inflight / "part").write_text("...")
    (tmp_path / "best").write_text("iter_0000002")
    removed = checkpointing.prune_checkpoints(tmp_path, keep_last=2, milestones=[3], protect=[5])
    assert sorted(removed) == ["iter_0000001", "iter_0000004", "iter_0000006"]
    assert sorted(_complete(root)) == [layout.iter_name(s) for s in (2, 3, 5, 7, 8)]
    assert set(_complete(root).values()) == {None} and (inflight / "part").is_file()
    assert checkpointing.prune_checkpoints(tmp_path, keep_last=0, milestones=[]) == []  # 0 = keep all


def test_interrupted_prune_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    """A prune killed mid-delete (or racing a save) never leaves a partial iter_* folder for resume to meet."""
    root = tmp_path / "checkpoints"
    for s in range(1, 5):
        _fake_ckpt(root, s)
    real = shutil.rmtree

    def dies_midway(path, ignore_errors=False):  # deletes one file, then the process "dies"
        next(p for p in sorted(__import__("pathlib").Path(path).iterdir()) if p.is_file()).unlink()

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dies_midway)
    checkpointing.prune_checkpoints(tmp_path, keep_last=1, milestones=[])
    assert list(_complete(root).items()) == [("iter_0000004", None)]
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real)
    checkpointing.prune_checkpoints(tmp_path, keep_last=1, milestones=[])
    assert not list(root.glob(".iter_*"))  # the leftovers of the interrupted prune are gone


# ---- runs --------------------------------------------------------------------------------------------------
def inflating_monitor(from_step: int, factor: float = 1.1):
    """The real monitor, seeing the general ppl at `factor` x the baseline's from `from_step` on (forgetting on
    demand: a random tiny model's ppl only falls)."""

    class Inflated(ForgettingMonitor):
        def observe(self, step, results):
            if step >= from_step:
                results = {k: dict(v, ppl=self.baseline[k]["ppl"] * factor) if v.get("group") == "general" else v
                           for k, v in results.items()}
            return super().observe(step, results)

    return Inflated


def _train(run, cache, *extra):
    from cpt_megatron.train.driver import train

    return train(load_recipe("tiny_cpu", [f"run.dir={run}", f"data.cache_dir={cache}", "eval.interval=2",
                                          "checkpoint.save_interval=2", "checkpoint.keep_last=0", *extra]))


def _logs(run):
    def read(name):
        return [json.loads(x) for x in (run / name).read_text().splitlines()]

    steps = [{k: v for k, v in m.items() if k not in ("tokens_per_s", "step_time_s", "tflops_per_gpu", "mfu")}
             for m in read("metrics.jsonl")]
    return steps, read("evals.jsonl"), read("events.jsonl")


def test_resumed_run_with_acting_monitor_matches_uninterrupted(tmp_path, tiny_cpu_cache, monkeypatch, capsys):
    """adapt acts at 2, is in cooldown at 4, acts at 6, hits max_actions at 8; a requeue after step 3 must not
    forget that (a monitor restarted on resume would act at 4)."""
    monkeypatch.setattr(monitor_mod, "ForgettingMonitor", inflating_monitor(from_step=2))
    pol = ["eval.monitor.policy=adapt", "eval.monitor.cooldown_evals=1", "eval.monitor.max_actions=2"]
    whole = _train(tmp_path / "whole", tiny_cpu_cache, *pol)
    first = _train(tmp_path / "split", tiny_cpu_cache, *pol, "train.exit_interval=3")
    second = _train(tmp_path / "split", tiny_cpu_cache, *pol)
    assert (first.last_step, second.first_step, second.last_step, whole.last_step) == (3, 4, 8, 8)
    ref, got = _logs(tmp_path / "whole"), _logs(tmp_path / "split")
    assert [e["action"] for e in ref[2] if e["action"]] == ["adapt", "adapt"]
    assert got[2] == ref[2]  # events.jsonl
    assert got[1] == ref[1]  # evals.jsonl
    assert got[0] == ref[0]  # every step's loss, lr, grad norm, mixture share
    assert first.losses + second.losses == whole.losses
    capsys.readouterr()
    _train(tmp_path / "split", tiny_cpu_cache, *pol, "data.alpha=0.5")  # a recipe change on resume: one line
    out = [ln for ln in capsys.readouterr().out.splitlines() if "recipe changed" in ln]
    assert len(out) == 1 and "data.alpha 0.7 -> 0.5" in out[0] and "from step 9" in out[0]


def test_rollback_after_requeue_with_async_saves_is_exact(tmp_path, tiny_cpu_cache, monkeypatch):
    """Requeued after step 5; at step 6 the monitor rolls back (lr_factor=1) to step 4, saved before the requeue,
    with async saves in flight and keep_last=1 (every prune races an async save): the re-run steps 5 and 6 equal
    the originals bit for bit (model, optimizer, data position and stability state all step 4's), the abandoned
    checkpoint is gone, the monitor remembers, every checkpoint left is complete."""
    monkeypatch.setattr(monitor_mod, "ForgettingMonitor", inflating_monitor(from_step=6))
    pol = ["eval.monitor.policy=rollback", "eval.monitor.lr_factor=1.0", "eval.monitor.max_actions=1",
           "checkpoint.async_save=true", "checkpoint.keep_last=1"]
    run = tmp_path / "run"
    assert _train(run, tiny_cpu_cache, *pol, "train.exit_interval=5").last_step == 5
    res = _train(run, tiny_cpu_cache, *pol)
    steps, _, events = _logs(run)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8] and res.last_step == 8
    for a, b in ((steps[4], steps[6]), (steps[5], steps[7])):
        assert (a["loss"], a["grad_norm"], a["lr"], a["consumed_samples"]) == \
            (b["loss"], b["grad_norm"], b["lr"], b["consumed_samples"])
    assert [(e["step"], e["action"]) for e in events if e["action"]] == [(6, "rollback")]
    final = checkpointing.read_run_state(run / "checkpoints")
    assert final["monitor"]["rollbacks"] == [{"step": 6, "to": 4}] and final["train"]["step"] == 8
    names = [p.name for p in layout.iteration_folders(run / "checkpoints")]
    assert "iter_0000005" not in names  # the abandoned branch's checkpoint: a requeue must not resume it
    assert names == ["iter_0000006", "iter_0000008"]  # keep_last=1 while 8 was being written, then 8
    assert all(checkpointing._problem(p) is None for p in layout.iteration_folders(run / "checkpoints"))


def test_distributed_optimizer_resume_is_exact(tmp_path, tiny_cpu_cache):
    """The distributed optimizer on torch Adam (megatron-core 0.16.1 without TE/apex), one rank: 4 steps == 2 +
    resume + 2, losses and every model and optimizer tensor bit for bit. megatron failed this resume (`assert
    len(steps) == 1` on the fresh optimizer, then KeyError 'step'), and a naive fix leaves every param sharing
    one step tensor, which foreach Adam advances once per param (Engine.load_optimizer_state). DP2 and a resume
    into another DP size: tests/test_train.py (make test-all)."""
    from test_train import ckpt_tensors

    opt = ["parallel.distributed_optimizer=true", "train.max_steps=4", "eval.interval=0"]
    whole = _train(tmp_path / "whole", tiny_cpu_cache, *opt)
    first = _train(tmp_path / "split", tiny_cpu_cache, *opt, "train.exit_interval=2")
    second = _train(tmp_path / "split", tiny_cpu_cache, *opt)
    assert (first.last_step, second.first_step, second.last_step) == (2, 3, 4)
    assert first.losses + second.losses == whole.losses
    got, ref = (ckpt_tensors(tmp_path / r / "checkpoints" / "iter_0000004") for r in ("split", "whole"))
    assert sum(k.startswith("optimizer.state.exp_avg_sq.") for k in ref) >= 9, sorted(ref)
    assert set(got) == set(ref) and all(got[k].equal(ref[k]) for k in ref), \
        [k for k in ref if not got[k].equal(ref[k])]
