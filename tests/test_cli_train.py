"""`cpt train --dry-run` and the command line of `cpt train` / `cpt prepare` (issue 19 items 1-2): a human
summary without --json, every check of the real run before anything is written, overrides anywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpt_megatron.cli import build_parser, main, parse_args


def dry(tmp_path, capsys, *overrides, json_out=False):
    argv = ["train", "--recipe", "tiny_cpu", "--dry-run", f"run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/c",
            *overrides, *(["--json"] if json_out else [])]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()  # a dry run writes nothing
    return rc, out, err


def test_dry_run_prints_a_summary_without_json(tmp_path, capsys):
    rc, out, err = dry(tmp_path, capsys)
    assert rc == 0 and err == ""
    assert out.splitlines()[:2] == ["recipe ok: 1 processes = tp 1 x pp 1 x dp 1",
                                    "  8 steps x 8 sequences (512 tokens/step, 4,096 tokens); 4 micro-batches per step"]
    assert "  data not prepared" in out
    assert f"run `cpt prepare --recipe tiny_cpu run.dir={tmp_path}/run data.cache_dir={tmp_path}/c` before" in out


def test_dry_run_json_is_the_last_line(tmp_path, capsys):
    rc, out, _ = dry(tmp_path, capsys, "parallel.tp=2", "--nproc", "4", json_out=True)
    res = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and res["ok"] and (res["tp"], res["dp"], res["world_size"]) == (2, 2, 4)
    assert res["micro_batches_per_step"] == 2 and res["prepared"] is False


@pytest.mark.parametrize("override,message", [
    ("data.alpha=1.5", "data.alpha=1.5 must be in [0, 1]"),
    ("train.max_steps=-3", "train.max_steps=-3 must be >= 1"),
    ("data.seq_len=0", "data.seq_len=0 must be >= 1"),
    ("eval.monitor.polcy=stop", "eval.monitor: "),
    ("eval.monitor.policy=explode", "monitor.policy='explode'"),
    ("data.phases=[{until: 0.5, alpha: 2.0}]", "phases[0].alpha=2.0: must be in [0, 1]"),
    ("data.phases=[{untill: 0.5}]", "data.phases: "),
    ("model.options.spec=fast", "model.spec must be auto|te|local, got 'fast'"),
    ("parallel.sp=true", "parallel.sp=true needs parallel.tp > 1"),
    ("train.global_batch=6", "train.global_batch=6 is not divisible by train.micro_batch*dp = 2*2"),
])
def test_dry_run_rejects_what_the_real_run_rejects(tmp_path, capsys, override, message):
    rc, out, err = dry(tmp_path, capsys, override, "--nproc", "2")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert lines[0].startswith("cpt train: error: ")


def _dataset(prefix, ids):
    from cpt_megatron.data.indexed import IndexWriter

    with IndexWriter(prefix, dtype=np.int32) as w:
        for doc in ids:
            w.add_document(np.asarray(doc, dtype=np.int32))
        w.finalize()
    return prefix


def test_dry_run_checks_prefix_data_against_the_model(tmp_path, capsys):
    ok = _dataset(tmp_path / "ok", [[1, 2, 3, 4] * 40] * 4)
    big = _dataset(tmp_path / "big", [[1, 2, 60000] * 40] * 4)  # the tiny Llama has 50257 rows
    src = "data.sources=[{{name: dom, group: domain, prefix: {}}}, {{name: gen, group: general, prefix: {}}}]"
    rc, out, _ = dry(tmp_path, capsys, src.format(ok, ok))
    assert rc == 0, out
    rc, _, err = dry(tmp_path, capsys, src.format(big, ok))
    assert rc == 2 and f"dataset {big} holds token id 60000 >= the model's vocab size 50257" in err
    idx = tmp_path / "ok.idx"
    idx.write_bytes(idx.read_bytes()[:-7])  # truncated index
    rc, _, err = dry(tmp_path, capsys, src.format(ok, ok))
    assert rc == 2 and f"{ok}" in err and "Traceback" not in err, err


def test_overrides_may_appear_anywhere():
    args = parse_args(build_parser(), ["train", "--recipe", "tiny_cpu", "a.b=1", "--nproc", "2", "c=2", "--json",
                                       "run.dir=runs/x"])
    assert args.overrides == ["a.b=1", "c=2", "run.dir=runs/x"] and args.nproc == 2 and args.json
    args = parse_args(build_parser(), ["prepare", "--recipe", "tiny_cpu", "-j", "2", "x=1"])
    assert args.overrides == ["x=1"] and args.workers == 2
    with pytest.raises(SystemExit) as e:
        parse_args(build_parser(), ["train", "--recipe", "tiny_cpu", "a=1", "--bogus", "b=2"])
    assert e.value.code == 2


def test_prepared_manifest_is_checked_by_content(tmp_path):
    """`cpt train` trusts the manifest only while every file has the size (load_prepared, every rank) and the xxh3
    checksum (verify_prepared, rank 0) that `cpt prepare` recorded."""
    from cpt_megatron.config import load_recipe
    from cpt_megatron.errors import CptError
    from cpt_megatron.train.prepare import (
        MANIFEST_VERSION,
        data_checksums,
        load_prepared,
        manifest_path,
        prepare_command,
        prepare_key,
        verify_prepared,
    )
    from cpt_megatron.utils import sha256_file, write_json

    base = tmp_path / "base"
    base.mkdir()
    (base / "cpt_meta.json").write_text('{"vocab_size": 50257}')
    dom, gen = _dataset(tmp_path / "dom", [[5, 6, 7] * 30] * 3), _dataset(tmp_path / "gen", [[8, 9] * 40] * 3)
    ov = [f"model.base={base}", "model.hf_config=null", f"data.cache_dir={tmp_path}/c",
          f"data.sources=[{{name: dom, group: domain, prefix: {dom}}}, {{name: gen, group: general, prefix: {gen}}}]"]
    cfg = load_recipe("tiny_cpu", ov)
    command = prepare_command("tiny_cpu", ov)
    with pytest.raises(CptError, match="prepared data for this recipe is missing; run `cpt prepare --recipe tiny_cpu"):
        load_prepared(cfg, command)
    write_json(manifest_path(cfg), {
        "version": MANIFEST_VERSION, "key": prepare_key(cfg), "base": str(base), "base_meta_sha256": sha256_file(base / "cpt_meta.json"),
        "tokenizer": "@gpt2", "vocab_size": 50257, "eod_id": 50256,
        "sources": [{"name": n, "prefix": str(p), **data_checksums(str(p))} for n, p in (("dom", dom), ("gen", gen))]})
    assert load_prepared(cfg, command)["vocab_size"] == 50257
    assert verify_prepared(load_prepared(cfg, command))["bytes"] > 0
    # weights, alpha and the run length are not part of the key: no re-prepare for them
    assert manifest_path(load_recipe("tiny_cpu", [*ov, "data.alpha=0.3", "train.max_steps=50"])) == manifest_path(cfg)
    assert manifest_path(load_recipe("tiny_cpu", [*ov, "data.append_eod=false"])) != manifest_path(cfg)
    idx = tmp_path / "gen.idx"
    data = idx.read_bytes()
    idx.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other content
    prepared = load_prepared(cfg, command)  # same size: passes the cheap check
    assert verify_prepared(prepared, "size")["bytes"] == 0
    for mode in ("full", "sampled"):  # the .idx is checksummed in full in both modes
        with pytest.raises(CptError, match=f"prepared data {gen}.idx is damaged .*source gen.*; run `cpt prepare"):
            verify_prepared(prepared, mode)
    idx.write_bytes(data[:-1])
    with pytest.raises(CptError, match=f"changed since it was prepared: {gen}.idx has"):
        load_prepared(cfg, command)
    idx.write_bytes(data)
    (base / "cpt_meta.json").write_text('{"vocab_size": 50304}')
    with pytest.raises(CptError, match="changed or missing base checkpoint"):
        load_prepared(cfg, command)


def test_preemption_handler_restores_previous_handlers():
    import signal

    from cpt_megatron.train.signals import PreemptionHandler

    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGUSR1, mine)
    try:
        h = PreemptionHandler()
        assert signal.getsignal(signal.SIGUSR1) == h._handle
        h.restore()
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, old)
