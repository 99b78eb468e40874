"""Checkpoint integrity (issue 16 items 2, 3): the manifest catches damaged files, explicit loads fail in one
line naming the file, and resume=auto picks the newest checkpoint that is complete and verifies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_checkpoint import _tokenizer, make_hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny imported checkpoint (Megatron-LM layout: ROOT/release/)."""
    from cpt_megatron.checkpoint.hf_import import import_hf

    root = tmp_path_factory.mktemp("integrity")
    _tokenizer(root / "tok")
    hf = make_hf("smollm2", root / "hf", vocab=1000, tokenizer=root / "tok")
    import_hf(hf, root / "ck", verify=False)
    return root / "ck"


def _copy(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def _shard(root: Path) -> Path:
    return max((root / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.fixture
def cli(capsys):
    """`cpt ARGV` in-process (a non-CptError would escape as the traceback the tests forbid): (rc, stderr lines)."""
    from cpt_megatron.checkpoint.io import _VERIFIED
    from cpt_megatron.cli import main

    def run(*argv):
        _VERIFIED.clear()
        rc = main(list(argv))
        return rc, capsys.readouterr().err.strip().splitlines()
    return run


def _zero_8k(f: Path) -> None:
    """Zero 8 KB of real (non-zero) data from the middle of `f` (padding rows and fresh moments are zeros)."""
    data = bytearray(f.read_bytes())
    off = len(data) // 2
    while not any(data[off:off + 8192]):
        off = (off + 8192) % max(1, len(data) - 8192)
    data[off:off + 8192] = bytes(8192)
    f.write_bytes(bytes(data))


def _one_line_naming(rc, err, name: str, word: str):
    assert rc == 2, err
    assert not any("Traceback" in line for line in err), "\n".join(err)
    assert name in err[-1] and word in err[-1], err[-1]


def test_manifest_written_last_and_lists_every_file(ckpt):
    man = json.loads((ckpt / "release" / "cpt_manifest.json").read_text())
    files = {str(p.relative_to(ckpt / "release")) for p in (ckpt / "release").rglob("*") if p.is_file()}
    assert set(man["files"]) == files - {"cpt_manifest.json"}
    assert {".metadata", "common.pt", "metadata.json", "cpt_meta.json", "megatron_args.txt"} <= set(man["files"])
    assert man["algorithm"] == "xxh3_64" and all(set(v) == {"size", "checksum"} for v in man["files"].values())


def test_zeroed_block_in_distcp_is_refused_naming_the_file(ckpt, tmp_path, cli):
    bad = _copy(ckpt, tmp_path / "bad")
    shard = _shard(bad)
    _zero_8k(shard)
    rc, err = cli("export-hf", "--ckpt", str(bad), "--out", str(tmp_path / "hf"), "--no-verify")
    _one_line_naming(rc, err, shard.name, "checksum mismatch")
    assert not (tmp_path / "hf").exists()
    rc, err = cli("resize-embeddings", "--ckpt", str(bad), "--tokenizer", str(ckpt / "release" / "tokenizer"),
                   "--out", str(tmp_path / "rs"))
    _one_line_naming(rc, err, shard.name, "checksum mismatch")


@pytest.mark.parametrize("victim", ["distcp", ".metadata"])
def test_truncated_file_is_one_line(ckpt, tmp_path, victim, cli):
    bad = _copy(ckpt, tmp_path / "bad")
    f = _shard(bad) if victim == "distcp" else bad / "release" / ".metadata"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    rc, err = cli("export-hf", "--ckpt", str(bad), "--out", str(tmp_path / "hf"), "--no-verify")
    _one_line_naming(rc, err, f.name, "truncated")
    # without a manifest (a checkpoint from before it existed): still one line naming the file, no EOFError
    (bad / "release" / "cpt_manifest.json").unlink()
    rc, err = cli("export-hf", "--ckpt", str(bad), "--out", str(tmp_path / "hf"), "--no-verify")
    assert rc == 2 and not any("Traceback" in line for line in err), "\n".join(err[-5:])
    assert "damaged or truncated" in err[-1] and str(f) in err[-1], err[-1]


# -- resume selection --------------------------------------------------------------------------------------
def _run_with(ckpt: Path, tmp_path: Path, steps: dict) -> Path:
    """RUN/checkpoints/iter_N for each step: 'ok' (complete, verifies), 'zeroed', 'truncated', 'partial'."""
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    for step, state in steps.items():
        d = root / f"iter_{step:07d}"
        shutil.copytree(ckpt / "release", d)
        (d / "train_state.json").write_text(json.dumps({"step": step}))
        from cpt_megatron.checkpoint import layout

        layout.write_manifest(d)
        shard = max(d.glob("*.distcp"), key=lambda p: p.stat().st_size)
        if state == "zeroed":
            _zero_8k(shard)
        elif state == "truncated":
            shard.write_bytes(shard.read_bytes()[:1000])
        elif state == "partial":
            (d / "metadata.json").unlink()
    return tmp_path / "run"


def test_resume_auto_skips_damaged_and_missing(ckpt, tmp_path):
    from cpt_megatron.train.checkpointing import select_resume

    run = _run_with(ckpt, tmp_path, {4: "ok", 8: "zeroed", 12: "truncated", 16: "partial"})
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("20")  # a folder that is gone
    got, skipped = select_resume(run, "auto")
    assert got == run / "checkpoints" / "iter_0000004"
    assert [s.split(":")[0].split(" ")[0] for s in skipped] == ["iter_0000020", "iter_0000016", "iter_0000012",
                                                                "iter_0000008"]
    assert "missing" in skipped[0] and "metadata.json: missing from the checkpoint" in skipped[1]
    assert "truncated" in skipped[2] and "checksum mismatch" in skipped[3]


def test_resume_never_silently_restarts_from_base(ckpt, tmp_path):
    from cpt_megatron.errors import CptError
    from cpt_megatron.train.checkpointing import select_resume

    run = _run_with(ckpt, tmp_path, {8: "zeroed"})
    with pytest.raises(CptError, match="resume=base"):
        select_resume(run, "auto")
    assert select_resume(run, "base")[0] is None
    with pytest.raises(CptError, match="already has checkpoints"):
        select_resume(run, "none")
    # only a tracker, naming a folder that does not exist (a crash between prune and rename)
    lone = tmp_path / "lone"
    (lone / "checkpoints").mkdir(parents=True)
    (lone / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("9")
    with pytest.raises(CptError, match="iter_0000009"):
        select_resume(lone, "auto")
    assert select_resume(tmp_path / "fresh", "auto") == (None, [])


def test_old_layout_still_resolves(ckpt, tmp_path):
    """Checkpoints written before the Megatron-LM layout: tensors + cpt_meta.json at the top, `latest` tracker."""
    from cpt_megatron.checkpoint import arch_from_ckpt, layout

    old = tmp_path / "old_import"
    shutil.copytree(ckpt / "release", old)
    (old / "cpt_manifest.json").unlink()
    assert layout.resolve(old) == old and arch_from_ckpt(old).num_layers == 4
    run = tmp_path / "run" / "checkpoints"
    shutil.copytree(ckpt / "release", run / "iter_0000003")
    (run / "latest").write_text("iter_0000003\n")
    assert layout.resolve(run) == run / "iter_0000003" == layout.resolve(tmp_path / "run")
    assert layout.resolve(run / "latest") == run / "iter_0000003"  # the tracker file itself (slurm/convert.sh)


# -- through `cpt train` --------------------------------------------------------------------------------------
def train(run_dir: Path, cache: Path, *overrides: str) -> tuple[int, dict | None, str]:
    """`cpt train --recipe tiny_cpu` (the one place this file launches training): (rc, JSON line, stderr)."""
    import os
    import subprocess
    import sys

    from conftest import cpt_prepare

    cpt_prepare(cache, *overrides)
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", "tiny_cpu", f"run.dir={run_dir}",
           f"data.cache_dir={cache}", *overrides, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=repo,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = out.stdout.strip().splitlines()
    res = json.loads(lines[-1]) if out.returncode == 0 and lines else None
    return out.returncode, res, out.stdout + out.stderr


@pytest.mark.slow  # three tiny_cpu launches
def test_train_resume_skips_missing_and_corrupt_checkpoints(tmp_path, tiny_cpu_cache):
    run, cache = tmp_path / "run", tiny_cpu_cache
    rc, first, log = train(run, cache, "train.exit_interval=4")
    assert rc == 0 and first["last_step"] == 4, log[-3000:]
    root = run / "checkpoints"
    (root / "latest_checkpointed_iteration.txt").write_text("9")  # names a folder that does not exist
    shutil.copytree(root / "iter_0000004", root / "iter_0000006")  # newer, but damaged
    shard = max((root / "iter_0000006").glob("*.distcp"), key=lambda p: p.stat().st_size)
    _zero_8k(shard)
    rc, second, log = train(run, cache, "train.exit_interval=1")
    assert rc == 0, log[-3000:]
    assert second["first_step"] == 5 and second["last_step"] == 5  # from iter_0000004, not from the base
    assert "resume: skipped iter_0000009 (named by the tracker): missing" in log
    skipped = [line for line in log.splitlines() if line.startswith("resume: skipped iter_0000006")]
    assert skipped and shard.name in skipped[0] and "checksum mismatch" in skipped[0], skipped or log[-2000:]


_RANKS = r"""
import json, os, sys
import torch.distributed as dist
from cpt_megatron.checkpoint import layout
from cpt_megatron.checkpoint.io import open_checkpoint
from cpt_megatron.errors import CptError
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
calls = []
real = layout._digest
layout._digest = lambda p, a="xxh3_64": calls.append(p.name) or real(p, a)
out = {}
for name in sys.argv[1:]:
    n0 = len(calls)
    try:
        out[name] = {"ok": str(open_checkpoint(name, collective=True))}
    except CptError as e:
        out[name] = {"error": str(e)}
    out[name]["digests"] = len(calls) - n0
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_collective_open_checksums_on_rank0_only_and_every_rank_gets_the_verdict(ckpt, tmp_path):
    """A job's ranks read the base's checksums once (rank 0) instead of once per rank; a damaged base is
    the same one-line error on every rank (no rank trains on while another fails)."""
    import os
    import socket
    import subprocess
    import sys

    bad = _copy(ckpt, tmp_path / "bad")
    _zero_8k(_shard(bad))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANKS, str(ckpt), str(bad)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r)}) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    r0, r1 = (json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    files = len(json.loads((ckpt / "release" / "cpt_manifest.json").read_text())["files"])
    assert r0[str(ckpt)]["digests"] == files > 1 and r1[str(ckpt)]["digests"] == 0
    assert r0[str(ckpt)]["ok"] == r1[str(ckpt)]["ok"] == str(ckpt / "release")
    assert r1[str(bad)]["digests"] == 0 and "checksum mismatch" in r0[str(bad)]["error"]
    assert r0[str(bad)]["error"] == r1[str(bad)]["error"] and _shard(bad).name in r1[str(bad)]["error"]
