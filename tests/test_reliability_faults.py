"""Issue 27, crash safety: a kill -9 at a deterministic point (CPT_FAULT=<point>, read only by
`cpt_megatron.utils.fault_point`) of every multi-file writer, then a rerun: it finishes or starts over cleanly, names
and removes what the killed run left, and its output is byte-identical to an uninterrupted run. Plus the launcher's
signals (start-up SIGTERM, also without --nproc; a killed torchrun agent) and a read-only checkpoints/ found before step 1.
Linux only (kill points and process checks read /proc). docs/reliability.md lists each guarantee with its test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpt_megatron.runtime.procs import children, pid_alive

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill points and process checks read /proc")


def _cpt(*args, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "CPT_FAULT"}
    if fault:
        env["CPT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cpt_megatron", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name))


def _corpus(path: Path, n: int = 400) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}: " + " ".join(f"w{(i * 7 + j) % 311}" for j in range(60))}) + "\n")
    return path


# -- publish by rename, retire by rename (utils.atomic_dir / publish_dir / retire_dir) ----------------------------
_WRITER = """
import sys
from pathlib import Path
from cpt_megatron.utils import atomic_dir
with atomic_dir(sys.argv[1], overwrite=sys.argv[3] == "overwrite") as tmp:
    for i in range(3):
        (tmp / f"shard-{i}").write_text(sys.argv[2] * (i + 1))
    (tmp / "index.json").write_text(sys.argv[2])
"""


@pytest.mark.parametrize("point", ["atomic_dir.before_publish", "publish.aside", "publish.retire"])
def test_replacing_an_output_killed_at_any_point_loses_nothing(tmp_path, point):
    """Every multi-file output (export-hf, curate, import, resize, tokenizer extend) goes through atomic_dir: a kill
    before the publish keeps the old output whole; between its two renames (old aside, new not yet in place) the next
    run puts the old one back; after them (old not yet deleted) the new one is whole. The rerun names and removes what
    was left and its output equals an uninterrupted run's."""
    out = tmp_path / "out"

    def write(text: str, fault: str | None = None, mode: str = "overwrite") -> subprocess.CompletedProcess:
        env = {**ENV, **({"CPT_FAULT": fault} if fault else {})}
        return subprocess.run([sys.executable, "-c", _WRITER, str(out), text, mode], capture_output=True, text=True,
                              env=env)

    assert write("old").returncode == 0
    old = _tree(out)
    killed = write("new", fault=point)
    assert killed.returncode == -signal.SIGKILL
    assert _leftovers(tmp_path)
    if point == "publish.retire":
        assert _tree(out) == {"shard-0": b"new", "shard-1": b"newnew", "shard-2": b"newnewnew", "index.json": b"new"}
    elif point == "publish.aside":
        assert not out.exists()  # the window the issue hit: the next writer restores the old output first
        kept = write("other", mode="keep")  # a writer that must not replace: finds the old output back in place
        assert kept.returncode == 1 and "already exists" in kept.stderr, kept.stderr
        assert f"cpt: restored {out} from .out." in kept.stderr and _tree(out) == old
        assert "cpt: removed stale" in kept.stderr, kept.stderr  # the finished new temp
    else:
        assert _tree(out) == old
    rerun = write("new")
    assert rerun.returncode == 0, rerun.stderr
    if point != "publish.aside":
        assert "cpt: removed stale" in rerun.stderr, rerun.stderr
    assert _tree(out) == {"shard-0": b"new", "shard-1": b"newnew", "shard-2": b"newnewnew", "index.json": b"new"}
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


def test_stale_temps_of_a_live_writer_are_left_alone(tmp_path):
    from cpt_megatron.utils import _host, remove_stale_temps

    live = tmp_path / f".out.{os.getppid()}@{_host()}.abc.tmp"  # our parent: alive
    other_host = tmp_path / ".out.1@some-other-node.abc.tmp"
    for p in (live, other_host):
        p.mkdir()
    assert remove_stale_temps(tmp_path / "out") == []
    assert live.exists() and other_host.exists()


def test_curate_killed_before_publish_rerun_removes_temp_and_matches(tmp_path):
    """Row 5 (curate): kill -9 after the shards are written, before the rename: the `.out.<pid>@<host>.*.tmp`
    folder is removed (and named) by the next run, whose output equals an uninterrupted run's."""
    src = _corpus(tmp_path / "in.jsonl")
    ref = _cpt("curate", "-i", src, "-o", tmp_path / "ref", "--stages", "normalize,exact_dedup")
    assert ref.returncode == 0, ref.stderr
    killed = _cpt("curate", "-i", src, "-o", tmp_path / "out", "--stages", "normalize,exact_dedup",
                  fault="atomic_dir.before_publish")
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "out").exists()
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.") and stale[0].endswith(".tmp"), stale
    rerun = _cpt("curate", "-i", src, "-o", tmp_path / "out", "--stages", "normalize,exact_dedup")
    assert rerun.returncode == 0, rerun.stderr
    assert f"cpt: removed stale {tmp_path / stale[0]} (left by pid" in rerun.stderr
    assert not _leftovers(tmp_path)
    assert _tree(tmp_path / "out") == _tree(tmp_path / "ref")


def test_preprocess_killed_while_deleting_shards_reruns_clean_and_identical(tmp_path, gpt2_tokenizer_dir):
    """Row 3: kill -9 while `cpt preprocess` deletes PREFIX.shards/ after the merge (before: every rerun exit 2,
    `No such file or directory: .../tok.shards/000017_text.bin`). The folder is renamed aside first, so the rerun finds
    no half-deleted shards; it removes the aside (named) and writes the same bytes. A finished shard that lost a file
    is redone, not trusted."""
    src = _corpus(tmp_path / "in.jsonl", n=1500)
    args = ["--input", src, "--tokenizer", gpt2_tokenizer_dir, "--chunk-mb", "0.05"]
    ref = _cpt("preprocess", *args, "--out", tmp_path / "ref" / "tok")
    assert ref.returncode == 0, ref.stderr
    want = {e: (tmp_path / "ref" / f"tok.{e}").read_bytes() for e in ("bin", "idx")}
    out = tmp_path / "run"
    killed = _cpt("preprocess", *args, "--out", out / "tok", fault="retire")
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "tok.shards").exists() and _leftovers(out)
    rerun = _cpt("preprocess", *args, "--out", out / "tok")
    assert rerun.returncode == 0, rerun.stderr
    assert "cpt: removed stale" in rerun.stderr and ".tok.shards." in rerun.stderr
    assert not _leftovers(out) and not (out / "tok.shards").exists()
    assert {e: (out / f"tok.{e}").read_bytes() for e in ("bin", "idx")} == want
    # the state a kill in the middle of the old rmtree left: a finished shard missing its .bin
    kept = _cpt("preprocess", *args, "--out", out / "tok", "--keep-shards")
    assert kept.returncode == 0, kept.stderr
    (out / "tok.shards" / "000002_text.bin").unlink()
    again = _cpt("preprocess", *args, "--out", out / "tok", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["shards_skipped"] >= 1
    assert {e: (out / f"tok.{e}").read_bytes() for e in ("bin", "idx")} == want


_PREPARE = """
import sys
from cpt_megatron.config import DataSection, DataSourceConfig
from cpt_megatron.train.prepare import prepare_sources, resolve_tokenizer
data = DataSection(cache_dir=sys.argv[1], sources=[
    DataSourceConfig(name="dom", group="domain", inputs=[sys.argv[2]], curate_stages=["normalize"])])
print(prepare_sources(data, resolve_tokenizer("@gpt2"))[0]["prefix"])
"""


@pytest.mark.heavy  # ~20-25 s on 2 busy cores: two prepares in subprocesses
def test_prepare_killed_before_recording_checksums_rebuilds_identical(tmp_path, gpt2_tokenizer_dir):
    """Row 5 (prepare): kill -9 after tokenizing, before the checksums are recorded: the rerun does not trust the
    unrecorded files, rebuilds them (saying so) to the same bytes, and leaves no temp behind."""
    src = _corpus(tmp_path / "in.jsonl")

    def run(cache: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**ENV, **({"CPT_FAULT": fault} if fault else {})}
        return subprocess.run([sys.executable, "-c", _PREPARE, str(cache), str(src)], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=300)

    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = run(tmp_path / "c", fault="prepare.before_checks")
    assert killed.returncode == -signal.SIGKILL
    rerun = run(tmp_path / "c")
    assert rerun.returncode == 0, rerun.stderr
    assert "have no recorded checksums (an interrupted prepare): rebuilding them" in rerun.stderr
    prefix, ref_prefix = Path(rerun.stdout.split()[-1]), Path(ref.stdout.split()[-1])
    for e in ("bin", "idx"):
        assert Path(f"{prefix}.{e}").read_bytes() == Path(f"{ref_prefix}.{e}").read_bytes()
    assert json.loads((prefix.parent / "tokens.check.json").read_text()) == \
        json.loads((ref_prefix.parent / "tokens.check.json").read_text())
    assert not [p for p in (tmp_path / "c").rglob("*") if ".tmp" in p.name]


# -- the --nproc launcher -------------------------------------------------------------------------------------------
def _wait_for(cond, timeout: float = 120, what: str = "") -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _launch(tmp_path) -> subprocess.Popen:
    """`cpt train --nproc 2` on data that was never prepared: the ranks fail only after their imports (seconds),
    so a signal sent as soon as they exist lands in start-up."""
    cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", "tiny_cpu", f"run.dir={tmp_path / 'run'}",
           f"data.cache_dir={tmp_path / 'cache'}", "--nproc", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)


def _ranks(pid: int) -> list[int]:
    out = []
    for c in children(pid, recursive=True):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"cpt_megatron.runtime.torchrun" not in cmd and b"cpt_megatron" in cmd:
            out.append(c)
    return out


def test_sigterm_during_nproc_startup_exits_75_with_one_line(tmp_path):
    """Row 9: SIGTERM to `cpt train --nproc 2` before the ranks installed their handler (exit 143 and no message
    before): one line saying nothing was saved and why, exit 75 so Slurm's requeue fires; nothing left running."""
    proc = _launch(tmp_path)
    try:
        _wait_for(lambda: len(_ranks(proc.pid)) >= 2 or proc.poll() is not None, what="two ranks")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        tree = children(proc.pid, recursive=True)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert ("cpt train: SIGTERM arrived during start-up, before the ranks could save: nothing was saved by this "
            "launch") in err, err[-3000:]
    _wait_for(lambda: not any(pid_alive(p) for p in tree), timeout=10, what=f"{tree} to exit")


def _catches(pid: int, sig: int) -> bool:
    """`pid` has a handler installed for `sig` (/proc/PID/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_sigterm_during_single_process_startup_exits_75_with_one_line(tmp_path):
    """Single-process `cpt train` SIGTERMed before the trainer's handler exists (exit 143 and no message before):
    the handler `cpt train` installs right after parsing its arguments says so in one line and exits 75. The signal
    is sent as soon as SIGTERM is caught, i.e. during the seconds of imports before the data check (never
    prepared here, so a missed signal fails with exit 2)."""
    cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", "tiny_cpu", f"run.dir={tmp_path / 'run'}",
           f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    try:
        _wait_for(lambda: _catches(proc.pid, signal.SIGTERM) or proc.poll() is not None, timeout=60,
                  what="the start-up handler")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["cpt train: SIGTERM arrived during start-up, before training could save: nothing was saved by "
                     "this launch (a rerun resumes from the last checkpoint); exit 75 so the job is requeued"], err
    assert not (tmp_path / "run").exists()


def test_killed_torchrun_agent_is_named(tmp_path):
    """Row 10: kill -9 of the torchrun agent under `cpt train --nproc 2` (exit 247, no message before): one line
    naming the agent and the signal, exit 137; its ranks die with it."""
    proc = _launch(tmp_path)
    try:
        _wait_for(lambda: len(_ranks(proc.pid)) >= 2 or proc.poll() is not None, what="two ranks")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        agent = children(proc.pid)[0]
        tree = children(proc.pid, recursive=True)
        os.kill(agent, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert f"cpt train: the torchrun agent (pid {agent}) was killed by SIGKILL; its ranks died with it" in err, err
    _wait_for(lambda: not any(pid_alive(p) for p in tree), timeout=10, what=f"{tree} to exit")


def test_read_only_checkpoints_found_before_the_first_step(tmp_path):
    """Row 11: a read-only run.dir/checkpoints is refused by the recipe checks (before any step, on every rank and in
    `cpt train --dry-run`), in one line naming the folder; before, it was found at the first save."""
    from cpt_megatron.config import load_recipe
    from cpt_megatron.errors import CptError
    from cpt_megatron.train.checks import check_writable, recipe_problems

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    check_writable(run)
    check_writable(tmp_path / "not" / "yet")  # a folder to be created: its parent is probed
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(run / "checkpoints")],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(CptError, match=rf"run.dir: {run / 'checkpoints'} is not writable \(Read-only file system\)"):
            check_writable(run)
        problems = recipe_problems(load_recipe("tiny_cpu", [f"run.dir={run}"]), 1)
        assert any("is not writable" in p for p in problems), problems
    finally:
        subprocess.run(["umount", str(run / "checkpoints")], capture_output=True)


# -- heavy: the same guarantees through the real commands (make test-all) ----------------------------------------
def _models_only_cache(tiny_cpu_cache: Path, cache: Path) -> None:
    """A fresh cache that shares the session's imported tiny base (sources are prepared again, ~15 s)."""
    import shutil

    cache.mkdir(parents=True)
    shutil.copytree(tiny_cpu_cache / "models", cache / "models")


@pytest.mark.heavy
def test_cpt_train_refuses_damaged_prepared_data_before_step_1_then_prepare_rebuilds(tmp_path, tiny_cpu_cache):
    """Rows 1-2 end to end: 64 KiB zeroed in a prepared tokens.bin and a bit flipped in a tokens.idx; `cpt train`
    exits 2 before step 1 with one line naming the file and the `cpt prepare` command (exit 0 and different losses
    before); that command rebuilds both sources byte for byte; training then runs."""
    cache = tmp_path / "cache"
    _models_only_cache(tiny_cpu_cache, cache)
    run = tmp_path / "run"
    ov = [f"data.cache_dir={cache}", f"run.dir={run}", "train.max_steps=2"]
    prep = _cpt("prepare", "--recipe", "tiny_cpu", *ov, "--json", timeout=900)
    assert prep.returncode == 0, prep.stderr[-3000:]
    man = json.loads(prep.stdout.strip().splitlines()[-1])
    src = {s["name"]: Path(s["prefix"]) for s in man["sources"]}
    good = {n: {e: Path(f"{p}.{e}").read_bytes() for e in ("bin", "idx")} for n, p in src.items()}
    bad = bytearray(good["stdlib"]["bin"])
    bad[1 << 19: (1 << 19) + 65536] = bytes(65536)
    Path(f"{src['stdlib']}.bin").write_bytes(bad)
    idx = bytearray(good["pydoc"]["idx"])
    idx[-9] ^= 4
    Path(f"{src['pydoc']}.idx").write_bytes(idx)
    refused = _cpt("train", "--recipe", "tiny_cpu", *ov, timeout=900)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("cpt train: error: prepared data ") and "is damaged (xxh3_64 checksum differs" in line, line
    assert not (run / "metrics.jsonl").exists()
    command = line.split("; run `")[1].split("`")[0]
    assert command.startswith("cpt prepare --recipe tiny_cpu")
    rebuilt = _cpt(*command.split()[1:], timeout=900)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "tokens.bin differs from its recorded xxh3_64 checksum (damaged): rebuilding it" in rebuilt.stderr
    assert "tokens.idx differs from its recorded xxh3_64 checksum (damaged): rebuilding it" in rebuilt.stderr
    assert {n: {e: Path(f"{p}.{e}").read_bytes() for e in ("bin", "idx")} for n, p in src.items()} == good
    trained = _cpt("train", "--recipe", "tiny_cpu", *ov, "--json", timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "data: verified" in trained.stdout and "(full, xxh3_64)" in trained.stdout


@pytest.mark.heavy
@pytest.mark.parametrize("point", ["publish.aside", "publish.retire", "atomic_dir.before_publish"])
def test_export_hf_overwrite_killed_at_any_point_is_whole_after_rerun(tmp_path, tiny_cpu_cache, point):
    """Row 4: kill -9 of `cpt export-hf --overwrite` at each point of the replace (before: killed while deleting the
    old export, `out/` lacked a shard its index lists yet looked finished, the new export stranded in `.out.*.tmp`).
    Whatever the point, `out/` is a whole export (old or new); the rerun restores/removes what was left (named)
    and writes the same bytes as an uninterrupted export."""
    base = next(p for p in (tiny_cpu_cache / "models").iterdir() if p.name.startswith("random-") and
                not p.name.endswith("-hf"))
    args = ["export-hf", "--ckpt", base, "--no-verify", "--max-shard-size", "1MB"]
    ref = _cpt(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "out"
    assert _cpt(*args, "--out", out).returncode == 0
    killed = _cpt(*args, "--out", out, "--overwrite", fault=point)
    assert killed.returncode == -signal.SIGKILL
    if out.exists():  # never a partial export under the final name
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert all((out / f).is_file() for f in set(index["weight_map"].values()))
    rerun = _cpt(*args, "--out", out, "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cpt: removed stale" in rerun.stderr or "cpt: restored" in rerun.stderr
    assert _tree(out) == _tree(tmp_path / "ref") and not _leftovers(tmp_path)
