"""slurm/*.sh on a real one-node Slurm cluster (tests/slurm_setup.sh), and shellcheck.

The rendezvous and preemption plumbing (signal forwarding, exit 75, `scontrol requeue`, resume) is tested
with a stub trainer so it does not depend on the model; the last two tests run the real `cpt train`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The real-trainer tests: which recipe and overrides make `cpt train` a short CPU run.
TINY_RECIPE = os.environ.get("CPT_SLURM_TEST_RECIPE", "tiny_cpu")
TINY_OVERRIDES = os.environ.get("CPT_SLURM_TEST_OVERRIDES", "train.max_steps=16 checkpoint.save_interval=4")


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Start (or confirm) the local cluster; skip with the reason when Slurm cannot run here."""
    if not shutil.which("sbatch"):
        pytest.skip("Slurm is not installed (apt-get install -y slurmctld slurmd munge)")
    ok = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if ok.returncode == 0 and re.search(r"idle|mixed|alloc", ok.stdout) and _daemons_up():
        return ok.stdout.strip()
    if os.geteuid() != 0:
        pytest.skip("Slurm is not running and starting it needs root (sudo bash tests/slurm_setup.sh)")
    r = subprocess.run(["bash", str(REPO / "tests" / "slurm_setup.sh")], capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        pytest.skip(f"Slurm cannot start here: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout.strip()


def _daemons_up() -> bool:
    return all(subprocess.run(["pgrep", "-x", d], capture_output=True).returncode == 0 for d in ("slurmctld", "slurmd"))


def _sbatch(script: Path, *, env: dict[str, str], out: Path, extra: list[str] = ()) -> str:
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={out}", f"--export={exports}", *extra, str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait(job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    deadline = time.time() + timeout
    info: dict[str, str] = {}
    while time.time() < deadline:
        info = _job(job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"job {job_id} did not finish in {timeout}s (state {info.get('JobState')}); log tail:\n{tail}")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _metrics(run_dir: Path) -> dict[int, float]:
    """step -> loss from <run.dir>/metrics.jsonl (the last record of a step wins: a resumed run rewrites it)."""
    path = run_dir / "metrics.jsonl"
    losses: dict[int, float] = {}
    if not path.exists():
        return losses
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "step" in rec and "loss" in rec:
            losses[int(rec["step"])] = float(rec["loss"])
    return losses


def _final_loss(run_dir: Path) -> float:
    losses = _metrics(run_dir)
    assert losses, f"no step/loss records in {run_dir / 'metrics.jsonl'}"
    return losses[max(losses)]


def _assert_complete_checkpoint(run_dir: Path) -> Path:
    """The trainer's own resume pointer names a complete megatron-core checkpoint of the last logged step."""
    from megatron.core.dist_checkpointing import check_is_distributed_checkpoint

    from cpt_megatron.train.checkpointing import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    listing = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))[:40]
    assert ckpt is not None, f"no resumable checkpoint under {run_dir}: {listing}"
    assert check_is_distributed_checkpoint(str(ckpt)), f"{ckpt} has no dist-checkpoint metadata: {listing}"
    assert not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")], listing  # no half-written save
    assert int(re.findall(r"\d+", ckpt.name)[-1]) == max(_metrics(run_dir)), (ckpt, max(_metrics(run_dir)))
    return ckpt


def _preempt_once(job_id: str, run_dir: Path, log: Path, min_steps: int = 3, timeout: float = 600) -> dict:
    """Send USR1 to the batch shell once the run has logged a few steps; wait for requeue and completion."""
    _wait_for(lambda: len(_metrics(run_dir)) >= min_steps or _job(job_id).get("JobState") in TERMINAL,
              timeout, f"{min_steps} logged steps in {run_dir}")
    assert _job(job_id).get("JobState") == "RUNNING", "the job finished before it could be preempted"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    info = _wait(job_id, timeout, log)
    return info


# ---------------------------------------------------------------------------------------------- stub trainer

STUB = r'''
"""Stands in for `cpt train` here: same argv, env and preemption protocol, deterministic 'loss'."""
import json, os, signal, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
if sys.argv[1] == "prepare":  # the job's first step: record that it ran before training, in its own step
    open(os.path.join(args["run.dir"], "prepared.stub"), "a").write(os.environ.get("SLURM_STEP_ID", "?") + "\n")
    sys.exit(0)
assert sys.argv[1] == "train" and "--recipe" in sys.argv and args.get("resume") == "auto", sys.argv
run = args["run.dir"]; steps = int(args.get("train.steps", 30)); rank = int(os.environ["RANK"])
ckpt = os.path.join(run, "checkpoints", "latest.json")
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1)); signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
with open(os.path.join(run, f"rank{rank}.env"), "a") as f:
    f.write(" ".join(f"{k}={os.environ.get(k)}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")) + "\n")
step, x = 0, 1.0
if os.path.exists(ckpt):
    st = json.load(open(ckpt)); step, x = st["step"], st["x"]
while step < steps:
    x = x * 0.93 + 0.01 * ((step * 7919) % 13)
    step += 1
    if rank == 0:
        with open(os.path.join(run, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": x}) + "\n")
    time.sleep(0.25)
    if stop:
        if rank == 0:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            json.dump({"step": step, "x": x}, open(ckpt + ".tmp", "w")); os.replace(ckpt + ".tmp", ckpt)
        sys.exit(75)
'''


@pytest.fixture()
def stub_cpt(tmp_path: Path) -> str:
    stub = tmp_path / "stub_cpt.py"
    stub.write_text(STUB)
    return f"{sys.executable} {stub}"


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.slurm
def test_rendezvous_two_tasks(slurm_cluster, tmp_path):
    script = tmp_path / "rdzv.sh"
    script.write_text(
        "#!/usr/bin/env bash\n#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\nset -euo pipefail\n"
        'source "$CPT_REPO/slurm/common.sh"\ncpt_rendezvous\n'
        "cpt_launch bash -c 'echo \"rdzv RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK "
        "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT\"'\n"
    )
    log = tmp_path / "rdzv.out"
    job = _sbatch(script, env={"CPT_REPO": str(REPO)}, out=log)
    info = _wait(job, 120, log)
    assert info["JobState"] == "COMPLETED", log.read_text()
    lines = [dict(kv.split("=", 1) for kv in ln.split()[1:]) for ln in log.read_text().splitlines() if ln.startswith("rdzv ")]
    assert sorted(int(d["RANK"]) for d in lines) == [0, 1]
    assert {d["WORLD_SIZE"] for d in lines} == {"2"}
    assert sorted(int(d["LOCAL_RANK"]) for d in lines) == [0, 1]  # one node: local rank = rank
    assert {d["MASTER_ADDR"] for d in lines} == {socket.gethostname().split(".")[0]}
    assert {d["MASTER_PORT"] for d in lines} == {str(20000 + int(job) % 20000)}


@pytest.mark.slurm
@pytest.mark.slow  # Slurm delays a requeued job's start by ~2 min
@pytest.mark.heavy  # minutes: `make test-all` (not in `make test`)
def test_preemption_requeue_plumbing_with_stub_trainer(slurm_cluster, tmp_path, stub_cpt):
    """USR1 -> forwarded to srun -> trainer saves, exits 75 -> scontrol requeue -> resume=auto finishes."""
    env = {"CPT_REPO": str(REPO), "CPT": stub_cpt, "OVERRIDES": "train.steps=30"}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _sbatch(SLURM_DIR / "cpt_tiny_cpu.sh", env={**env, "RUN_DIR": str(ref_dir)}, out=tmp_path / "ref.out")
    assert _wait(ref, 300, tmp_path / "ref.out")["JobState"] == "COMPLETED"

    log = tmp_path / "run.out"
    job = _sbatch(SLURM_DIR / "cpt_tiny_cpu.sh", env={**env, "RUN_DIR": str(run_dir)}, out=log)
    info = _preempt_once(job, run_dir, log, min_steps=5)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert info.get("Restarts") == "1", f"expected one requeue, got {info.get('Restarts')}:\n{text}"
    assert "requeueing job" in text
    # both ranks got RANK/WORLD_SIZE through cpt_task_env, in both the first and the requeued run
    for rank in (0, 1):
        starts = (run_dir / f"rank{rank}.env").read_text().splitlines()
        assert len(starts) == 2 and all(f"RANK={rank} WORLD_SIZE=2" in s for s in starts)
    assert max(_metrics(run_dir)) == 30
    assert _final_loss(run_dir) == _final_loss(ref_dir)
    # `cpt prepare` ran as the first job step (step 0) of each start, before the training step
    assert (run_dir / "prepared.stub").read_text().split() == ["0", "0"]
    assert sorted((run_dir / "slurm").glob("*.env"))  # run-dir layout from cpt_run_dir


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_cpu_training_completes(slurm_cluster, tmp_path):
    """Real `cpt train` (the lead's trainer) under sbatch with 2 tasks leaves metrics and a checkpoint."""
    run_dir, log = tmp_path / "tiny", tmp_path / "tiny.out"
    env = {"CPT_REPO": str(REPO), "RUN_DIR": str(run_dir), "RECIPE": TINY_RECIPE, "OVERRIDES": TINY_OVERRIDES}
    job = _sbatch(SLURM_DIR / "cpt_tiny_cpu.sh", env=env, out=log)
    info = _wait(job, 900, log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert _metrics(run_dir), f"no metrics in {run_dir}"
    _assert_complete_checkpoint(run_dir)


@pytest.mark.slurm
@pytest.mark.slow  # Slurm delays a requeued job's start by ~2 min
@pytest.mark.heavy  # minutes: `make test-all` (not in `make test`)
def test_tiny_cpu_preempt_requeue_same_final_loss(slurm_cluster, tmp_path):
    """USR1 mid-run: real `cpt train` checkpoints, exits 75, is requeued and ends at the same loss."""
    base = {"CPT_REPO": str(REPO), "RECIPE": TINY_RECIPE, "OVERRIDES": TINY_OVERRIDES}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _sbatch(SLURM_DIR / "cpt_tiny_cpu.sh", env={**base, "RUN_DIR": str(ref_dir)}, out=tmp_path / "ref.out")
    assert _wait(ref, 900, tmp_path / "ref.out")["JobState"] == "COMPLETED", (tmp_path / "ref.out").read_text()[-3000:]

    log = tmp_path / "run.out"
    job = _sbatch(SLURM_DIR / "cpt_tiny_cpu.sh", env={**base, "RUN_DIR": str(run_dir)}, out=log)
    info = _preempt_once(job, run_dir, log, min_steps=2, timeout=900)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert info.get("Restarts") == "1", log.read_text()[-3000:]
    _assert_complete_checkpoint(run_dir)
    assert max(_metrics(run_dir)) == max(_metrics(ref_dir))
    assert _final_loss(run_dir) == pytest.approx(_final_loss(ref_dir), rel=1e-6, abs=1e-7)


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    scripts = sorted(SLURM_DIR.glob("*.sh")) + [REPO / "tests" / "slurm_setup.sh", REPO / "tests" / "services_up.sh"]
    r = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.heavy  # ~2.5 min: three proxy jobs and the fit job
def test_mixture_search_array_then_fit(slurm_cluster, tmp_path):
    """slurm/mixture_search.sh as its header says: an array task per alpha trains one proxy, then a job without
    --array fits the law from all of them (reused, none retrained) and writes the recommendation."""
    from conftest import cpt_prepare

    cache, out = tmp_path / "cache", tmp_path / "search"
    cpt_prepare(cache)
    env = {"CPT_REPO": str(REPO), "RECIPE": "tiny_cpu", "ALPHAS": "0,0.5,1", "PROXY_STEPS": "2", "OUT": str(out),
           "OVERRIDES": f"data.cache_dir={cache} run.dir={tmp_path / 'run'}"}
    cpu = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the script asks for a GPU node; this cluster has CPUs
    arr = _sbatch(SLURM_DIR / "mixture_search.sh", env=env, out=tmp_path / "arr-%a.out", extra=["--array=0-2", *cpu])
    fit = _sbatch(SLURM_DIR / "mixture_search.sh", env=env, out=tmp_path / "fit.out",
                  extra=[f"--dependency=afterok:{arr}", *cpu])
    info = _wait(fit, 900, tmp_path / "fit.out")
    logs = "".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    assert len(list(out.glob("proxies/*/metrics.json"))) == 3, logs
    res = json.loads((out / "search.json").read_text())
    assert [p["reused"] for p in res["proxies"]] == [True, True, True], logs   # the fit job trained nothing
    assert (out / "recommendation.yaml").is_file() and (out / "search.png").is_file()
