"""Device correctness without a GPU (issue #17 item 1-2): the device guard on verify / eval / train step / EWC /
import + export, the megatron-core pin, loud CPU redirects, TE feature validation, compile off with TE.

The megatron-core paths run in ONE subprocess (tests/device_scenarios.py): the CPU redirects never enter the
pytest process. The model runs on the `meta` device where a CPU tensor reaching it is the bug a GPU would hit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpt_megatron.errors import CptError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from device_guard import DeviceGuard, DeviceMixError  # noqa: E402


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    out = tmp_path_factory.mktemp("device")
    res = subprocess.run([sys.executable, str(REPO / "tests" / "device_scenarios.py"), str(out)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ok(report, name):
    r = report[name]
    assert r["ok"], f"{name}: {r['error']}\n{r.get('trace', '')}"
    return r


# -- the guard itself (pure torch, in-process) ------------------------------------------------------------
def test_guard_catches_cpu_input_to_a_meta_model():
    """What verify.py did before #17: CPU token ids into an embedding on another device. torch accepts it on
    meta (embedding(cpu_ids, meta_weight) returns meta); the guard does not."""
    w = torch.empty(10, 4, device="meta")
    ids = torch.tensor([[1, 2, 3]], device="cpu")
    assert torch.nn.functional.embedding(ids, w).device.type == "meta"  # torch alone misses it
    with pytest.raises(DeviceMixError, match=r"embedding mixes devices \['cpu', 'meta'\]"):
        with DeviceGuard():
            torch.nn.functional.embedding(ids, w)
    with DeviceGuard():  # the fix: move the input to the model's device
        assert torch.nn.functional.embedding(ids.to("meta"), w).shape == (1, 3, 4)


def test_guard_flags_factories_without_device_and_counts_syncs():
    g = DeviceGuard(modules=(__name__,))
    with pytest.raises(DeviceMixError, match="torch.zeros without device="):
        with g:
            torch.zeros(3)
    g = DeviceGuard(modules=(__name__,))
    with g:
        t = torch.zeros(3, device="cpu")
        float(t.sum())
        t.sum().item()
    assert len(g.syncs) == 2 and all("test_device" in s for s in g.syncs)


# -- megatron-core paths under the guard (subprocess) -----------------------------------------------------
def test_verify_forward_on_meta_device(scenarios):
    r = _ok(scenarios, "verify_meta")  # CPU tokens in, model on `meta`: every tensor verify makes follows it
    assert r["device"] == "meta" and r["shape"] == [2, 16, 50257]


def test_verify_reporter_rank_names_device(scenarios):
    assert _ok(scenarios, "reporter_rank")["rank"] == 0


def test_train_step_has_no_host_sync_of_ours(scenarios):
    r = _ok(scenarios, "train_step")
    assert r["syncs_in_step"] == []  # megatron's grad-norm .item() is the step's only host sync
    assert r["syncs_total"] == 1  # reading StepResult.loss/.tokens: one sync for both
    assert not r["skipped"] and 10.0 < r["loss"] < 11.5


def test_eval_step_one_sync(scenarios):
    r = _ok(scenarios, "eval_step")
    assert r["syncs"] == 1 and r["tokens"] == 64


def test_ewc_syncs(scenarios):
    r = _ok(scenarios, "ewc")
    assert (r["fisher_syncs"], r["step_syncs"], r["penalty_syncs"]) == (0, 0, 1)
    assert r["penalty"] > 0


def test_import_verify_export_guarded(scenarios):
    r = _ok(scenarios, "import_verify_export")
    assert r["max_abs_diff"] <= 1e-4 and r["spec"] == "local"  # the spec training uses on this machine
    assert "model-00001-of-00001.safetensors" in r["exported"]


# -- version pin, loud redirects ----------------------------------------------------------------------------
def test_megatron_core_pin_checked(monkeypatch):
    import importlib.metadata as md

    from cpt_megatron.runtime import device

    assert device.check_megatron_core() == "0.16.1"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"megatron-core==0.16.1"' in pyproject
    real = md.version
    monkeypatch.setattr(md, "version", lambda d: "0.15.0" if d == "megatron-core" else real(d))
    with pytest.raises(CptError, match=r"^megatron-core 0.15.0 is installed: cpt-megatron needs megatron-core==0.16.1"):
        device.check_megatron_core()


def test_cpu_redirects_fail_loudly_on_missing_module():
    code = ("from cpt_megatron.runtime import cpu_redirects as c\n"
            "c._MODULES = c._MODULES + ('megatron.core.no_such_module',)\n"
            "c.install()\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "megatron-core module megatron.core.no_such_module is missing" in res.stderr


def test_env_shows_megatron_core_version():
    from cpt_megatron.cli.env import collect

    info = collect()
    assert info["megatron_core"] == "0.16.1" and info["megatron_core_required"] == "0.16.1"
    assert info["device_in_use"] == "cpu"


# -- TE spec features and compile ---------------------------------------------------------------------------
def test_compile_off_with_te_spec():
    from cpt_megatron.model import ModelOptions
    from cpt_megatron.model.kernels import resolve_kernels

    assert resolve_kernels(ModelOptions(), spec="te", cuda=True).compile == "off"
    assert resolve_kernels(ModelOptions(), spec="local", cuda=True).compile == "layer"
    with pytest.raises(ValueError, match="model.compile=layer with the Transformer Engine spec"):
        resolve_kernels(ModelOptions(compile="layer"), spec="te", cuda=True)


@pytest.mark.parametrize("overrides, message", [
    (["train.fp8=hybrid"], "train.fp8=hybrid needs the Transformer Engine spec"),
    (["parallel.cp=2"], r"parallel.cp=2 \(context parallel\) needs Transformer Engine attention"),
    (["parallel.tp_comm_overlap=true"], "parallel.tp_comm_overlap needs Transformer Engine userbuffers"),
    (["model.options.spec=local", "train.fp8=e4m3"], "train.fp8=e4m3 needs the Transformer Engine spec, but model.options.spec=local"),
])
def test_dry_run_rejects_te_features_without_te(overrides, message):
    from cpt_megatron.config import load_recipe
    from cpt_megatron.train.dryrun import dry_run

    cfg = load_recipe("tiny_cpu", overrides)
    with pytest.raises(CptError, match=message):
        dry_run(cfg, nproc=cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)


def test_te_feature_combinations():
    from cpt_megatron.model.build import check_te_features
    from cpt_megatron.runtime import ParallelConfig

    check_te_features(ParallelConfig(tp=2, sp=True, tp_comm_overlap=True, cp=2), "te", "hybrid")  # valid with TE
    with pytest.raises(CptError, match="tp_comm_overlap needs parallel.tp > 1 and parallel.sp=true"):
        check_te_features(ParallelConfig(tp=1, tp_comm_overlap=True), "te")
    with pytest.raises(CptError, match="train.fp8 must be null|hybrid|e4m3"):
        check_te_features(ParallelConfig(), "te", "e5m2")
    assert ParallelConfig(tp=2, cp=2).dp(8) == 2
    with pytest.raises(CptError, match="tp\\*pp\\*cp = 2\\*1\\*2 = 4"):
        ParallelConfig(tp=2, cp=2).dp(6)


def test_gpu_defaults_resolved_on_gpu(monkeypatch):
    """use_cpu_initialization off, param-gather overlap with the distributed optimizer, bucket from model size."""
    from cpt_megatron.runtime import ParallelConfig
    from cpt_megatron.train.engine import ddp_bucket_size

    assert ParallelConfig(distributed_optimizer=True).param_gather_overlap(cuda=True)
    assert not ParallelConfig(distributed_optimizer=True).param_gather_overlap(cuda=False)
    assert not ParallelConfig().param_gather_overlap(cuda=True)
    assert ddp_bucket_size(1_000_000, 8) == 40_000_000
    assert ddp_bucket_size(1_000_000_000, 8) == 62_500_000  # 1B local params: 16 buckets
    assert ddp_bucket_size(1_000_000_000, 128) == 128_000_000  # Megatron-LM: >= 1M x dp


# -- the step DataLoader (read-ahead on TP rank 0) ----------------------------------------------------------
class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        t = torch.arange(i, i + 9, dtype=torch.int64)
        return {"tokens": t[:-1], "labels": t[1:]}


@pytest.mark.parametrize("workers", [0, 1])
def test_step_loader_matches_plain_reads(workers):
    from cpt_megatron.train.batches import rank_microbatches
    from cpt_megatron.train.data_loader import StepLoader

    ds = _Toy()
    loader = StepLoader(global_batch=8, dp_rank=1, dp=2, micro=2, workers=workers, pin_memory=False)
    for start in (0, 8, 16, 8, 40):  # sequential read-ahead, then a rollback to 8, then a jump
        mbs, samples = loader.get(ds, start)
        ref, ref_samples = rank_microbatches(ds, start, 8, 1, 2, 2)
        assert len(mbs) == 2 and all(torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
                                     for a, b in zip(mbs, ref))
        assert int(mbs[0]["tokens"][0, 0]) == start + 4  # DP rank 1 of 2: the second half of the global batch
        assert len(samples) == len(ref_samples) == 4


def test_comm_device_follows_the_backend():
    """Collective payloads: the compute device under NCCL, the CPU under gloo (the conversion group on a GPU node)."""
    from cpt_megatron.runtime.device import comm_device, current_device, device_override
    from cpt_megatron.runtime.distributed import _free_port

    with device_override("meta"):  # a stand-in for cuda
        assert comm_device() == current_device() == torch.device("meta")  # no group yet: the compute device
        torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
        try:
            assert comm_device() == torch.device("cpu")
        finally:
            torch.distributed.destroy_process_group()
