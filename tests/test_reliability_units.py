"""Issue 16, fast checks without training: run lock, log cut-back, disk full (injected ENOSPC and a real tmpfs),
temp-file cleanup, bad text on every path, `cpt select` keeping the previous best, umask-honouring outputs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_megatron.cli import main
from cpt_megatron.errors import CptError

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- 1. run lock ---------------------------------------------------------------------------------------

def test_run_lock_refuses_while_held_and_takes_over_a_dead_holder(tmp_path, capsys):
    from cpt_megatron.train.runlock import RunLock

    holder = subprocess.Popen([sys.executable, "-c", textwrap_holder(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CptError, match=rf"is in use by another `cpt train` \(host .*, pid {holder.pid}, started "):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    lock = RunLock(tmp_path)  # the kernel dropped the dead holder's flock; its record remains
    assert f"taking over the stale lock {tmp_path / '.lock'}" in capsys.readouterr().err
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""
    RunLock(tmp_path).release()  # a clean release is not "stale"
    assert "stale" not in capsys.readouterr().err


def textwrap_holder(run_dir: Path) -> str:
    return ("import sys, time\nfrom cpt_megatron.train.runlock import RunLock\n"
            f"lock = RunLock({str(run_dir)!r})\nprint('held', flush=True)\ntime.sleep(120)\n")


# ---- 6. logs cut back on resume ------------------------------------------------------------------------

def test_cut_logs_keeps_each_step_once(tmp_path):
    from cpt_megatron.train.metrics import cut_logs

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 9))
                                            + '{"step": 9, "lo')  # torn by a kill
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps({"step": s, "results": {}}) + "\n" for s in (0, 4, 8)))
    (tmp_path / "events.jsonl").write_text(json.dumps({"step": 6, "kind": "warn"}) + "\n")
    assert cut_logs(tmp_path, 4) == {"metrics.jsonl": 5, "evals.jsonl": 1, "events.jsonl": 1}
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in (tmp_path / "evals.jsonl").read_text().splitlines()] == [0, 4]
    assert (tmp_path / "events.jsonl").read_text() == ""
    assert cut_logs(tmp_path, None) == {"metrics.jsonl": 4, "evals.jsonl": 2}  # restart from the base


# ---- 7. disk full and temp files ------------------------------------------------------------------------

def test_failed_save_removes_partial_folder_and_names_disk_space(tmp_path):
    from cpt_megatron.train.saveguard import save_guard

    root = tmp_path / "checkpoints"
    (root / "iter_0000004").mkdir(parents=True)
    (root / "iter_0000004" / "shard.distcp").write_bytes(b"x" * 5000)
    (root / ".iter_0000002.tmp").mkdir()  # left by a killed run: removed before the next save
    with pytest.raises(CptError) as e:
        with save_guard(tmp_path, rank0=True):
            assert not (root / ".iter_0000002.tmp").exists()
            (root / ".iter_0000008.tmp").mkdir()
            (root / ".iter_0000008.tmp" / "half.distcp").write_bytes(b"y" * 100)
            raise RuntimeError("Worker failure") from OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert msg.startswith(f"no space left to save checkpoint {root / '.iter_0000008.tmp'}: ~5,000 bytes needed")
    assert "bytes free on its file system" in msg and "\n" not in msg
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004"]
    with pytest.raises(ValueError, match="unrelated"):  # other failures pass through (partial still removed)
        with save_guard(tmp_path, rank0=True):
            (root / ".iter_0000012.tmp").mkdir()
            raise ValueError("unrelated")
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_and_leaves_no_temp(tiny_tmpfs, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " + os.urandom(300).hex()}) + "\n" for i in range(3000)))
    rc = main(["curate", "-i", str(src), "-o", str(tiny_tmpfs / "out"), "--no-progress", "--stages", "normalize"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("cpt curate: error: No space left on device: ") and "bytes free" in err[0]
    assert list(tiny_tmpfs.iterdir()) == []  # the temp output folder is gone


def test_killed_merge_temp_removed_by_rerun_and_failed_preprocess_leaves_no_shards(gpt2_tokenizer_dir, tmp_path):
    import numpy as np

    from cpt_megatron.data import preprocess as pp
    from cpt_megatron.data.indexed import IndexWriter

    prefix = tmp_path / "ds_text_document"
    dead = _dead_pid()
    stale = [Path(f"{prefix}.bin.tmp{dead}"), Path(f"{prefix}.idx.tmp{dead}")]
    for p in stale:
        p.write_bytes(b"partial")
    live = Path(f"{prefix}.bin.tmp{os.getppid()}")  # a live writer's temp is left alone
    live.write_bytes(b"busy")
    with IndexWriter(prefix, np.uint16) as w:
        w.add_document([1, 2, 3])
        w.finalize()
    assert not any(p.exists() for p in stale) and live.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    cfg = pp.PreprocessConfig(inputs=[str(bad)], tokenizer=str(gpt2_tokenizer_dir), out=str(tmp_path / "o"),
                              progress=False)
    with pytest.raises(CptError, match="bad.jsonl:2: bad JSON"):
        pp.preprocess(cfg)
    assert not Path(f"{tmp_path / 'o'}.shards").exists()


def test_preprocess_merge_that_cannot_fit_is_refused_in_one_line(gpt2_tokenizer_dir, tmp_path, monkeypatch):
    import collections

    from cpt_megatron.data import preprocess as pp

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} with some words"}) + "\n" for i in range(200)))
    monkeypatch.setattr(pp.shutil, "disk_usage", lambda p: collections.namedtuple("U", "total used free")(1, 1, 100))
    cfg = pp.PreprocessConfig(inputs=[str(src)], tokenizer=str(gpt2_tokenizer_dir), out=str(tmp_path / "o"),
                              progress=False)
    with pytest.raises(CptError, match=r"not enough space to merge .*o\.shards into .*: [\d,]+ bytes needed, 100 "
                                       r"bytes free"):
        pp.preprocess(cfg)
    assert not list(tmp_path.glob("o_text_document.*"))  # nothing half-merged; shards kept for the rerun
    assert list((tmp_path / "o.shards").glob("*.done.json"))


# ---- 8. bad text -----------------------------------------------------------------------------------------

def _bad_inputs(tmp_path: Path) -> list[Path]:
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "first fine document here"}\n{"text": "lone \\ud800 surrogate"}\n'
                 '{"text": "pair \\ud83d\\ude00 is fine"}\n')
    t = tmp_path / "latin1.txt"
    t.write_bytes("café au lait, an old Latin-1 file\n".encode("latin-1"))
    return [j, t]


@pytest.mark.parametrize("workers", [1, 2])
def test_surrogates_and_undecodable_bytes_are_malformed_with_file_line(tmp_path, workers):
    from cpt_megatron.curate import curate, load_config

    inputs = _bad_inputs(tmp_path)
    res = curate(inputs, tmp_path / f"out{workers}", load_config(None, {"stages": ["normalize"]}), workers=workers)
    assert (res.read, res.kept, res.malformed) == (4, 2, 2)
    assert res.report["malformed_records"] == [
        f"{inputs[0]}:2: field 'text' holds a lone surrogate (U+D800 at character 5)",
        f"{inputs[1]}:1: undecodable bytes (not UTF-8: invalid continuation byte at byte 3 of the line); "
        "convert the file to UTF-8",
    ]


def test_separated_text_document_with_bad_bytes_is_malformed_at_its_line(tmp_path):
    from cpt_megatron.curate.config import InputConfig
    from cpt_megatron.curate.readers import Doc, read_documents

    f = tmp_path / "s.txt"
    f.write_bytes(b"# a\nfine\n# b\nbad \xff line\nmore\n# c\nok\n")
    recs = list(read_documents([f], InputConfig(doc_separator="^# ")))
    assert [r.position if isinstance(r, Doc) else str(r) for r in recs] == [
        1, f"{f}:4: undecodable bytes (not UTF-8: invalid start byte at byte 4 of the line); convert the file to UTF-8",
        6]


@pytest.mark.parametrize("fast", [True, False])
def test_preprocess_surrogate_same_error_on_fast_and_hf_paths(gpt2_tokenizer_dir, tmp_path, fast):
    from cpt_megatron.data import preprocess as pp

    src = _bad_inputs(tmp_path)[0]
    cfg = pp.PreprocessConfig(inputs=[str(src)], tokenizer=str(gpt2_tokenizer_dir), out=str(tmp_path / "o"),
                              progress=False, fast=fast)
    with pytest.raises(CptError, match=r"a\.jsonl:2: key 'text' holds a lone surrogate \(U\+D800 at character 5\)"):
        pp.preprocess(cfg)


# ---- 9. select keeps the previous best -----------------------------------------------------------------

def test_failed_select_keeps_previous_best_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000004").mkdir(parents=True)
    base = {"d": {"group": "domain", "ppl": 10.0}, "g": {"group": "general", "ppl": 10.0}}
    later = {"d": {"group": "domain", "ppl": 9.0}, "g": {"group": "general", "ppl": 10.1}}
    (run / "evals.jsonl").write_text(json.dumps({"step": 0, "results": base}) + "\n"
                                     + json.dumps({"step": 4, "results": later}) + "\n")
    assert main(["select", "--run", str(run)]) == 0
    before = {n: (run / n).read_bytes() for n in ("best", "selection.md", "selection.png")}
    assert before["best"] == b"iter_0000004\n"
    assert main(["select", "--run", str(run), "--max-general-regression", "0.001"]) == 2  # nothing feasible
    (run / "evals.jsonl").write_text(json.dumps({"step": 4, "results": later}) + "\n")  # broken: no baseline
    assert main(["select", "--run", str(run)]) == 2
    assert {n: (run / n).read_bytes() for n in before} == before


# ---- 10. outputs honour the umask ----------------------------------------------------------------------

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    from cpt_megatron.utils import atomic_dir, atomic_file, write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_file(tmp_path / "b.txt") as f:
            f.write("b")
        with atomic_dir(tmp_path / "out") as d:
            (d / "inner.txt").write_text("i")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "out" / "inner.txt").stat().st_mode & 0o777 == file_mode
