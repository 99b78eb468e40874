"""checkpoint.async_save (issue #17): megatron-core's async dist-checkpoint queue (train/async_save.py), on CPU."""

from __future__ import annotations

import json

import pytest
from conftest import cpt_train

from cpt_megatron.train.checkpointing import latest_checkpoint


def _train(run_dir, cache, *overrides):
    return cpt_train(run_dir, cache, *overrides)


@pytest.mark.slow
@pytest.mark.heavy  # minutes: `make test-all` (not in `make test`)
def test_async_save_then_resume(tmp_path, tiny_cpu_cache):
    run, cache = tmp_path / "run", tiny_cpu_cache
    first = _train(run, cache, "checkpoint.async_save=true", "train.exit_interval=4")
    ck = run / "checkpoints"
    assert first["last_step"] == 4 and latest_checkpoint(run).name == "iter_0000004"
    assert json.loads((ck / "iter_0000004" / "train_state.json").read_text())["step"] == 4
    assert not list(ck.glob(".*.tmp"))  # every background write finalized (renamed) before exit
    second = _train(run, cache, "checkpoint.async_save=true")
    assert second["first_step"] == 5 and second["last_step"] == 8
    assert latest_checkpoint(run).name == "iter_0000008"
    ref = _train(tmp_path / "ref", cache)  # synchronous save: the same run
    assert first["losses"] + second["losses"] == ref["losses"]
