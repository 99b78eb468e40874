"""checkpoint.async_save (issue #17): megatron-core's async dist-checkpoint queue (train/async_save.py), on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _train(run_dir, cache, *overrides):
    cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", "tiny_cpu", f"run.dir={run_dir}",
           f"data.cache_dir={cache}", *overrides, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_async_save_then_resume(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    first = _train(run, cache, "checkpoint.async_save=true", "train.exit_interval=4")
    ck = run / "checkpoints"
    assert first["last_step"] == 4 and (ck / "latest").read_text().strip() == "iter_0000004"
    assert json.loads((ck / "iter_0000004" / "train_state.json").read_text())["step"] == 4
    assert not list(ck.glob(".*.tmp"))  # every background write finalized (renamed) before exit
    second = _train(run, cache, "checkpoint.async_save=true")
    assert second["first_step"] == 5 and second["last_step"] == 8
    assert (ck / "latest").read_text().strip() == "iter_0000008"
    ref = _train(tmp_path / "ref", cache)  # synchronous save: the same run
    assert first["losses"] + second["losses"] == ref["losses"]
