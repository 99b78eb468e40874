"""Distributed curation (curate/distributed.py) == one-process `cpt curate`, for any number of shards."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from test_slurm import REPO, _wait, slurm_cluster  # noqa: F401, F811  (slurm_cluster: the session fixture)

from cpt_megatron.curate import CurateConfig, curate, load_config
from cpt_megatron.curate.distributed import run_stage, shard_files

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
          "upsilon phi chi psi omega patient dose clinic trial result cohort symptom therapy").split()


def _doc(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)) + "."


def _edit(text: str, rng: random.Random, k: int = 2) -> str:
    w = text.split()
    for _ in range(k):
        w[rng.randrange(len(w))] = rng.choice(_WORDS)
    return " ".join(w)


def _fixture(folder: Path, n_files: int = 6, per_file: int = 25) -> list[str]:
    """JSONL files with exact and near duplicates of documents in EARLIER files (so across any shard
    boundary), near-dups of near-dups (kept-ness matters), short docs the length filter drops, a
    malformed line and an email for PII."""
    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    paths = []
    for f in range(n_files):
        lines = []
        for i in range(per_file):
            r = rng.random()
            if made and r < 0.15:
                text = rng.choice(made)  # exact duplicate
            elif made and r < 0.35:
                text = _edit(rng.choice(made), rng, rng.choice([1, 2, 6]))  # near duplicate (some below threshold)
            elif r < 0.4:
                text = "too short"
            else:
                text = _doc(rng) + f" Contact user{f}x{i}@example.com for details."
            made.append(text)
            lines.append(json.dumps({"id": f"{f}-{i}", "text": text}))
        if f == 2:
            lines.insert(5, "{not json")
        p = folder / f"part-{f:02d}.jsonl"
        p.write_text("\n".join(lines) + "\n")
        paths.append(str(p))
    return paths


_OVERRIDES = {"stages": ["normalize", "length", "quality", "exact_dedup", "minhash_dedup", "pii"], "shard_docs": 7,
              "length": {"min_chars": 20}, "rejected_samples": 4}


def _cfg() -> CurateConfig:
    return load_config(None, _OVERRIDES)


def _kept(folder: Path) -> bytes:
    return b"".join(gzip.decompress(p.read_bytes()) for p in sorted(folder.glob("shard-*.jsonl.gz")))


def _report(folder: Path) -> dict:
    r = json.loads((folder / "report.json").read_text())
    r.pop("elapsed_s", None)
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    inputs = _fixture(root / "in")
    ref = root / "ref"
    res = curate(inputs, ref, _cfg())
    assert res.removed["exact_dedup"] > 5 and res.removed["minhash_dedup"] > 5 and res.malformed == 1
    return root, inputs, ref


@pytest.mark.parametrize("shards,workers", [(1, 1), (3, 2), (4, 1), (8, 1)])  # 8 > 6 files: empty shards
def test_local_executor_equals_one_process(corpus, shards, workers):
    root, inputs, ref = corpus
    out = root / f"out{shards}"
    res = run_stage(inputs, out, _cfg(), shards, workers=workers)
    assert len(res["done"]) == 2 * shards + 1 and res["skipped"] == []
    assert _kept(out) == _kept(ref)
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in ref.rglob("*"))
    for p in ref.rglob("*.gz"):  # every output file byte for byte (the rejected samples too)
        assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes(), p
    assert _report(out) == _report(ref)
    nd = _report(out)["near_dup"]
    assert nd["candidate_pairs"] >= nd["verified_pairs"] >= nd["removed"] > 0


@pytest.mark.parametrize("shards", [2, 4, 7])
def test_one_big_jsonl_file_is_split_by_byte_range_and_equals_one_process(corpus, tmp_path, shards):
    """A single uncompressed JSONL file spreads over every task (byte ranges cut at line starts); ids,
    positions (line numbers of the whole file), outputs and report equal the one-process run."""
    from cpt_megatron.curate.readers import FilePart

    root, inputs, _ = corpus
    lines = b"".join(Path(p).read_bytes() for p in inputs).split(b"\n")
    for k in range(3, len(lines), 17):  # blank lines, documents without an id (named by line number)
        lines[k] = b"" if k % 2 else json.dumps({"text": _doc(random.Random(k))}).encode()
    big = tmp_path / "all.jsonl"
    big.write_bytes(b"\n".join(lines))
    ref = curate([big], tmp_path / "ref", _cfg())
    parts = shard_files([big], shards)
    assert all(len(p) == 1 and isinstance(p[0], FilePart) for p in parts)
    assert [(p[0].lo, p[0].hi) for p in parts][0][0] == 0 and parts[-1][0].hi == big.stat().st_size
    out = tmp_path / "out"
    run_stage([big], out, _cfg(), shards)
    assert _kept(out) == _kept(tmp_path / "ref") and _report(out) == _report(tmp_path / "ref")
    assert ref.read == _report(out)["read"] and any(":" in json.loads(x)["id"] for x in _kept(out).splitlines())


def test_buckets_in_one_pair_chunks_equal_one_process(corpus, tmp_path, monkeypatch):
    """The buckets stage makes and decides its pairs in chunks of later documents (bounded memory) and
    appends them to the pair files: with one document's pairs per chunk the output is still the same."""
    import cpt_megatron.curate.distributed as dist

    root, inputs, ref = corpus
    import cpt_megatron.curate.dedup as dedup

    cfg = load_config(None, {**_OVERRIDES, "minhash_dedup": {"candidates": "bands"}})  # pairs made in `buckets`
    curate(inputs, tmp_path / "ref", cfg)
    calls, real = [], dedup._unique_pairs
    monkeypatch.setattr(dedup, "_unique_pairs", lambda *a: calls.append(len(a[0])) or real(*a))
    monkeypatch.setattr(dist, "_PAIR_TEMP_BYTES", 1 << 50)
    run_stage(inputs, tmp_path / "out", cfg, 3)
    assert len(calls) > 50  # one chunk per later document (3 without the patch: one per task)
    assert _kept(tmp_path / "out") == _kept(tmp_path / "ref") and _report(tmp_path / "out") == _report(tmp_path / "ref")


def test_shards_are_contiguous_and_balanced(tmp_path):
    files = []
    for i, n in enumerate([10, 10, 10, 10, 40]):
        files.append(tmp_path / f"{i}")
        files[-1].write_bytes(b"x" * n)
    parts = shard_files(files, 3)
    assert [f for p in parts for f in p] == files
    assert [len(p) for p in parts] == [3, 1, 1]  # middle bytes at 5, 15, 25, 35, 60 of 80
    assert shard_files(files[:1], 4) == [[], [], files[:1], []]


def test_resume_skips_done_tasks_and_redoes_missing(corpus):
    root, inputs, ref = corpus
    out, work = root / "resume", root / "resume.work"
    cfg = _cfg()
    r = run_stage(inputs, out, cfg, 3, stage="sketch", task=1)
    assert r["done"] == ["sketch:1"]
    with pytest.raises(Exception, match="needs every sketch task"):
        run_stage(inputs, out, cfg, 3, stage="buckets", task=0)
    r = run_stage(inputs, out, cfg, 3)
    assert r["skipped"] == ["sketch:1"] and "write:0" in r["done"]
    stamp = (work / "sketch" / "shard-00000" / "docs.pkl").stat().st_mtime_ns
    # a task killed mid-way leaves no folder (atomic rename): simulate by deleting one, then re-run
    shutil.rmtree(work / "buckets" / "part-00002")
    (work / "write.done").unlink()
    r = run_stage(inputs, out, cfg, 3, overwrite=True)
    assert r["done"] == ["buckets:2", "write:0"] and len(r["skipped"]) == 5
    assert (work / "sketch" / "shard-00000" / "docs.pkl").stat().st_mtime_ns == stamp
    assert _kept(out) == _kept(ref) and _report(out) == _report(ref)
    # a task that dies mid-way leaves no folder: the rerun does it and nothing else
    import cpt_megatron.curate.distributed as distributed

    shutil.rmtree(work / "buckets" / "part-00001")
    real = distributed._save_by_shard
    distributed._save_by_shard = lambda *a: (_ for _ in ()).throw(MemoryError("killed"))
    try:
        with pytest.raises(MemoryError):
            run_stage(inputs, out, cfg, 3, stage="buckets", task=1)
    finally:
        distributed._save_by_shard = real
    assert not (work / "buckets" / "part-00001").exists()
    assert not [p for p in (work / "buckets").iterdir() if p.name.startswith(".")]  # temp folder removed
    r = run_stage(inputs, out, cfg, 3, stage="buckets")
    assert r["done"] == ["buckets:1"]
    r = run_stage(inputs, out, cfg, 3)  # everything done: nothing runs
    assert r["done"] == [] and r["report"] is None
    with pytest.raises(Exception, match="fingerprint"):
        run_stage(inputs, out, cfg, 4, work=work)



@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_four_array_tasks_equal_one_process(corpus, slurm_cluster, tmp_path):  # noqa: F811
    """slurm/curate.sh on the real one-node Slurm (tests/slurm_setup.sh): 4 sketch + 4 buckets array tasks
    and the write job, chained by afterok, give the one-process result byte for byte."""
    import yaml

    _root, inputs, ref = corpus
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_OVERRIDES))
    out = tmp_path / "curated"
    env = {**os.environ, "CPT_REPO": str(REPO), "INPUT": " ".join(inputs), "OUT": str(out), "RECIPE": str(recipe),
           "ARRAY_TASKS": "4", "WORKERS": "1", "LOG_DIR": str(tmp_path)}
    r = subprocess.run(["bash", str(REPO / "slurm" / "curate.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ids = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv and kv.split("=")[0] in
               ("sketch", "buckets", "write"))
    info = _wait(ids["write"], 600)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    for stage in ("sketch", "buckets"):  # 4 array tasks each, all completed
        r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ids[stage], "-o", "JobID,State"], capture_output=True,
                           text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():  # sacct needs accounting; the logs show the tasks otherwise
            assert sorted(ln.split("|")[1] for ln in r.stdout.split()) == ["COMPLETED"] * 4, r.stdout
        assert len(list(tmp_path.glob(f"cpt-curate-{stage}-*.out"))) == 4, sorted(tmp_path.iterdir())
    assert sorted(p.name for p in (tmp_path / "curated.work" / "sketch").iterdir()) == [f"shard-{k:05d}" for k in range(4)]
    assert _kept(out) == _kept(ref)
    assert _report(out) == _report(ref)


def test_cli_staged_json_and_errors(corpus, tmp_path, capsys):
    from cpt_megatron.cli import main

    root, inputs, ref = corpus
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_OVERRIDES))  # JSON is YAML
    base = ["curate", *[a for i in inputs for a in ("-i", i)], "-c", recipe, "--no-progress"]
    out = tmp_path / "o"
    assert main([str(a) for a in [*base, "-o", out, "--shards", 2, "--stage", "sketch", "--task", 1, "--json"]]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["done"] == ["sketch:1"] and last["work"] == str(tmp_path / "o.work")
    assert main([str(a) for a in [*base, "-o", out, "--shards", 2, "--json"]]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["skipped"] == ["sketch:1"] and last["kept"] == _report(ref)["kept"]
    assert _kept(out) == _kept(ref)
    assert main([str(a) for a in [*base, "-o", tmp_path / "x", "--stage", "write"]]) == 2
    assert "need --shards" in capsys.readouterr().err
    assert main([str(a) for a in [*base, "-o", tmp_path / "y", "--shards", 2, "--stage", "write"]]) == 2
    err = capsys.readouterr().err
    assert "needs every buckets task" in err and len(err.strip().splitlines()) == 1
    assert main([str(a) for a in [*base, "-o", ref, "--shards", 2]]) == 2  # never replaces an output silently
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [
    {"stages": ["normalize", "length", "minhash_dedup"], "minhash_dedup": {"decide": "estimate"}},  # no exact stage
    {"stages": ["normalize", "exact_dedup", "pii"]},  # no near-dup stage
    {"minhash_dedup": {"candidates": "bands"}},  # LSH pairs enumerated in `buckets`, replayed in `write`
])
def test_other_stage_sets_equal_one_process(corpus, tmp_path, overrides):
    _root, inputs, _ref = corpus
    cfg = load_config(None, {**_OVERRIDES, **overrides})
    curate(inputs, tmp_path / "ref", cfg)
    run_stage(inputs, tmp_path / "out", cfg, 3)
    assert _kept(tmp_path / "out") == _kept(tmp_path / "ref")
    assert _report(tmp_path / "out") == _report(tmp_path / "ref")
