"""Issue 16 fault injection: two trainers on one run.dir, kill -9 inside a save (no orphans, logs cut back on
resume, stale lock taken over), `--nproc 2` + SIGTERM (exit 75, nothing left running), kill -9 of
`cpt curate -j 2`, training onto a full tmpfs (root only). Linux only (process checks read /proc)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import cpt_prepare

from cpt_megatron.runtime.procs import children, pid_alive
from cpt_megatron.train.checkpointing import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc")

# Trainer with a test hook: the forked checkpoint writer of the save at step HANG_STEP writes its pid to
# MARKER and sleeps, so the test can kill -9 the trainer while the writer (and its helpers) are alive.
_HANGING_TRAINER = textwrap.dedent("""
    import os, sys, time
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync as W
    orig = W.write_preloaded_data
    def hang(*a, **k):
        if "iter_%07d" % int(os.environ["HANG_STEP"]) in str(k.get("write_bucket", ("",))[0]):
            with open(os.environ["MARKER"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(600)
        return orig(*a, **k)
    W.write_preloaded_data = staticmethod(hang)
    from cpt_megatron.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _train_cmd(run_dir, cache, *overrides, nproc=1) -> list[str]:
    cmd = ["train", "--recipe", "tiny_cpu", f"run.dir={run_dir}", f"data.cache_dir={cache}", *overrides, "--json"]
    return cmd + (["--nproc", str(nproc)] if nproc > 1 else [])


def cpt_train(run_dir, cache, *overrides, nproc=1, expect=0, hang_step=None, marker=None, wait=True):
    """`cpt train` on the tiny recipe (the one place these tests start a trainer). wait=False returns the Popen."""
    cpt_prepare(cache, *overrides)
    args = _train_cmd(run_dir, cache, *overrides, nproc=nproc)
    env = dict(ENV)
    if hang_step is not None:
        cmd = [sys.executable, "-c", _HANGING_TRAINER, *args]
        env.update(HANG_STEP=str(hang_step), MARKER=str(marker))
    else:
        cmd = [sys.executable, "-m", "cpt_megatron", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == expect, err[-4000:]
    return out, err


def _wait_for(pred, timeout=300.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


@pytest.fixture
def cache(tiny_cpu_cache):
    return tiny_cpu_cache


@pytest.mark.slow  # two trainings + a refused one: ~40 s on a quiet 2-core machine
def test_lock_kill9_in_save_no_orphans_then_resume_logs_each_step_once(tmp_path, cache):
    run, marker = tmp_path / "run", tmp_path / "writer.pid"
    trainer = cpt_train(run, cache, hang_step=8, marker=marker, wait=False)
    try:
        _wait_for(lambda: (run / ".lock").exists() and (run / ".lock").read_text().strip(), what="the run lock")
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == trainer.pid
        # 1. a second trainer on the same run.dir refuses with one line naming the holder
        second = subprocess.run([sys.executable, "-m", "cpt_megatron", *_train_cmd(run, cache, "optim.lr=0.123")],
                                capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"pid {trainer.pid}" in err[0] and "is in use by another `cpt train`" in err[0], err
        config = run / "config.yaml"
        assert not config.exists() or "0.123" not in config.read_text()  # the refused trainer wrote nothing
        # 5. kill -9 while the forked checkpoint writer of step 8 is alive: nothing is left running
        _wait_for(lambda: _lines(marker) > 0, what="the step-8 checkpoint writer")
        tree = children(trainer.pid, recursive=True)
        writer = int(marker.read_text().split()[0])
        assert writer in tree and len(tree) >= 2, tree  # writer + multiprocessing helpers (Manager, tracker)
        trainer.kill()
        trainer.wait(30)
        _wait_for(lambda: not any(pid_alive(p) for p in tree), timeout=10, what=f"children {tree} to exit")
    finally:
        if trainer.poll() is None:
            trainer.kill()
    ckpts = run / "checkpoints"
    assert latest_checkpoint(run).name == "iter_0000004"
    assert not (ckpts / "iter_0000008").exists()
    assert _steps(run / "metrics.jsonl") == list(range(1, 9))  # step 8 was logged before its save
    assert _steps(run / "evals.jsonl") == [0, 4, 8]
    # 6. + 1. resume from step 4: the dead holder's lock is taken over, steps 5-8 appear once
    out, err = cpt_train(run, cache)
    assert f"taking over the stale lock {run / '.lock'}" in err and f"pid {trainer.pid}" in err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["first_step"] == 5 and res["last_step"] == 8
    assert _steps(run / "metrics.jsonl") == list(range(1, 9))
    assert _steps(run / "evals.jsonl") == [0, 4, 8]
    assert (run / ".lock").read_text() == ""  # a clean exit leaves no holder


@pytest.mark.slow  # a 2-rank training
def test_nproc_sigterm_saves_exits_75_and_leaves_nothing(tmp_path, cache):
    run = tmp_path / "run"
    proc = cpt_train(run, cache, "train.max_steps=40", nproc=2, wait=False)
    try:
        _wait_for(lambda: _lines(run / "metrics.jsonl") >= 2, what="two training steps")
        tree = children(proc.pid, recursive=True)
        assert len(tree) >= 3, tree  # torchrun agent + 2 ranks
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])  # rank 0's line is the last one
    assert res["stopped"].startswith("preempted by signal 15") and 2 <= res["last_step"] < 40
    assert latest_checkpoint(run).name == f"iter_{res['last_step']:07d}"
    assert "ChildFailedError" not in err and "Traceback" not in err, err[-3000:]
    _wait_for(lambda: not any(pid_alive(p) for p in tree), timeout=10, what=f"{tree} to exit")


def test_nproc_user_error_printed_once_json_last(tmp_path, cache):
    cpt_prepare(cache)
    out = subprocess.run([sys.executable, "-m", "cpt_megatron",
                          *_train_cmd(tmp_path / "run", cache, "train.global_batch=6", nproc=2)],
                         capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert out.returncode == 2
    msg = ("cpt train: error: train.global_batch=6 is not divisible by train.micro_batch*dp = 2*2; "
           "use a multiple of 4")
    assert out.stderr.count("error:") == 1 and msg in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"exit_code": 2, "error": msg}


def test_kill9_of_curate_workers_leaves_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i in range(60000):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * 12}) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "cpt_megatron", "curate", "-i", str(src), "-o", str(tmp_path / "out"),
                             "-j", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=ENV)
    try:
        _wait_for(lambda: len(children(proc.pid)) >= 2 or proc.poll() is not None, timeout=60, what="2 workers")
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.5)
        tree = children(proc.pid, recursive=True)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_for(lambda: not any(pid_alive(p) for p in tree), timeout=10, what=f"workers {tree} to exit")
    assert not (tmp_path / "out").exists()  # no final output that looks complete


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, pytest.param(True, marks=pytest.mark.heavy)], ids=["sync", "async"])
def test_train_on_a_full_disk_is_one_line_and_leaves_no_partial_save(tmp_path, cache, async_save):
    """Sync: the save raises. Async (`make test-all`): the background writer fails; the saver's finalize says so."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # one tiny-recipe checkpoint (~80 MB) fits, the second does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out, err = cpt_train(mnt / "run", cache, f"checkpoint.async_save={str(async_save).lower()}", expect=2)
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"cpt train: error: no space left to save checkpoint "
                               f"{mnt / 'run' / 'checkpoints' / '.iter_0000008.tmp'}: ~"), err[-2000:]
        assert "bytes needed (the size of the last checkpoint), " in line and " bytes free on its file system" in line
        assert "Traceback" not in err
        assert sorted(p.name for p in (mnt / "run" / "checkpoints").iterdir()) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
