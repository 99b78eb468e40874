"""Issue 19: bad input to any command is ONE stderr line naming the file/flag/value and what to do, exit 2,
no traceback, no partial output. Most cases run `cpt` in-process (`main(argv)`) and fail before any model
is built, so the whole file takes seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from cpt_megatron.errors import CptError

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture
def png(tmp_path) -> Path:
    p = tmp_path / "photo.png"
    p.write_bytes(PNG)
    return p


# ---------------------------------------------------------------------------------------------------
# item 7: argparse types shared by every command


@pytest.mark.parametrize("argv,needles", [
    (["curate", "-i", "x", "-o", "y", "-j", "0"], ["--workers/-j", "positive integer", "got 0"]),
    (["curate", "-i", "x", "-o", "y", "-j", "-1"], ["--workers/-j", "got -1"]),
    (["smoke", "--hf-config", "c.json", "--steps", "0"], ["--steps", "got 0"]),
    (["estimate", "--model", "llama3-8b", "--tokens", "1e9", "--gpus", "8", "--tp", "0"], ["--tp", "got 0"]),
    (["estimate", "--model", "llama3-8b", "--tokens", "-1e9", "--gpus", "8"], ["--tokens", "positive token count", "-1e9"]),
    (["estimate", "--model", "llama3-8b", "--tokens", "lots", "--gpus", "8"], ["--tokens", "'lots'"]),
    (["export-hf", "--ckpt", "a", "--out", "b", "--max-shard-size", "0"], ["--max-shard-size", "positive size"]),
    (["export-hf", "--ckpt", "a", "--out", "b", "--max-shard-size", "-5GB"], ["--max-shard-size", "-5GB"]),
    (["export-hf", "--ckpt", "a", "--out", "b", "--max-shard-size", "5XB"], ["--max-shard-size", "5XB", "5GB"]),
    (["tokenizer", "analyze", "-t", "a", "-i", "b", "--max-chars", "-1"], ["--max-chars", ">= 0", "-1"]),
    (["verify", "--hf", "a", "--ckpt", "b", "--seq-len", "0"], ["--seq-len", "got 0"]),
    (["eval", "--hf", "a", "--data", "b", "--micro-batch", "0"], ["--micro-batch", "got 0"]),
    (["preprocess", "--input", "a", "--tokenizer", "t", "--out", "o", "--workers", "0"], ["--workers", "got 0"]),
    (["mixture", "report", "--mixture", "m.yaml", "--seq-len", "0", "--train-samples", "1"], ["--seq-len"]),
])
def test_bad_numbers_fail_in_argparse(argv, needles, capsys):
    rc, out, err = cli(argv, capsys)
    assert_one_line_error(rc, out, err, *needles)
    assert out == ""


def test_size_and_count_types_accept_good_values():
    from cpt_megatron.cli._types import byte_size, token_count
    from cpt_megatron.utils import parse_size

    assert byte_size("5GB") == 5 * 10**9 and byte_size("2GiB") == 2 * 2**30 and byte_size("500mb") == 500 * 10**6
    assert parse_size(123) == 123 and byte_size("1e9") == 10**9
    assert token_count("100e9") == 100e9 and token_count("1_000") == 1000.0


# ---------------------------------------------------------------------------------------------------
# item 4: a truncated .idx / .bin names the file


def _dataset(prefix: Path, n_docs=20, vocab=100):
    from cpt_megatron.data.indexed import IndexWriter

    rng = np.random.default_rng(0)
    with IndexWriter(prefix, np.uint16) as w:
        lengths = rng.integers(5, 40, n_docs)
        w.add_documents(rng.integers(0, vocab - 1, int(lengths.sum())).astype(np.uint16), lengths)
        w.finalize()
    prefix.with_suffix(".meta.json").write_text(json.dumps({"tokenizer": {"vocab_size": vocab, "eod_id": vocab - 1}}))
    return prefix


def test_truncated_idx_and_bin_name_the_file(tmp_path, capsys):
    from cpt_megatron.data.indexed import read_index

    good, bad = _dataset(tmp_path / "gen"), _dataset(tmp_path / "med")
    full = Path(f"{bad}.idx").read_bytes()
    Path(f"{bad}.idx").write_bytes(full[:100])
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{name: med, group: domain, prefix: {bad}}}\n"
                   f"  - {{name: gen, group: general, prefix: {good}}}\n")
    rc, out, err = cli(["mixture", "report", "--mixture", mix, "--seq-len", "8", "--train-samples", "10", "--json"], capsys)
    assert_one_line_error(rc, out, err, f"{bad}.idx is truncated", "re-run `cpt preprocess`")
    assert out == ""
    Path(f"{bad}.idx").write_bytes(full)
    Path(f"{bad}.bin").write_bytes(Path(f"{bad}.bin").read_bytes()[:50])
    with pytest.raises(CptError, match=re.escape(f"{bad}.bin is truncated")):
        read_index(bad)


# ---------------------------------------------------------------------------------------------------
# item 5: env --set, eval --tokenizer, tokenizer extend --scripts


def test_env_set_unknown_field(capsys):
    rc, out, err = cli(["env", "--set", "nope=1", "--json"], capsys)
    assert_one_line_error(rc, out, err, "--set nope=1", "'nope'", "fused_ce")
    assert out == ""
    rc, out, err = cli(["env", "--set", "fused_ce"], capsys)
    assert_one_line_error(rc, out, err, "FIELD=VALUE", "'fused_ce'")


def test_eval_missing_tokenizer_names_the_flag(tmp_path, capsys):
    ckpt = tmp_path / "ck"
    (ckpt / "tokenizer").mkdir(parents=True)
    (ckpt / "cpt_meta.json").write_text("{}")
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    rc, out, err = cli(["eval", "--ckpt", ckpt, "--tokenizer", tmp_path / "missing_dir", "--data", data], capsys)
    last = assert_one_line_error(rc, out, err, "missing_dir: not found", "--tokenizer")
    assert "carries no tokenizer" not in last


def test_extend_unknown_script(tmp_path, capsys):
    text = tmp_path / "d.txt"
    text.write_text("some words here\n")
    rc, out, err = cli(["tokenizer", "extend", "-t", "unused", "-i", text, "--add", "5", "-o", tmp_path / "o",
                        "--scripts", "DEVANAGARI,KLINGON"], capsys)
    assert_one_line_error(rc, out, err, "unknown script KLINGON", "DEVANAGARI", "LATIN", "TAMIL")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# item 6: unreadable files name the file (and line)


def test_binary_and_non_utf8_inputs(tmp_path, png, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    cases = [
        (["verify", "--hf", "h", "--ckpt", "c", "--text", png], ["--text", str(png), "PNG image"]),
        (["verify", "--hf", "h", "--ckpt", "c", "--text", latin], [f"{latin}:2", "not UTF-8", "re-encode"]),
        (["mixture", "report", "--mixture", png, "--seq-len", "8", "--train-samples", "8"],
         [str(png), "PNG image", "docs/mixtures.md"]),
        (["estimate", "--hf-config", png, "--tokens", "1e9", "--gpus", "8"], [str(png), "PNG image", "config.json"]),
        (["smoke", "--hf-config", png], [str(png), "PNG image"]),
        (["smoke", "--hf-config", latin], [f"{latin}:2", "not UTF-8"]),
    ]
    for argv, needles in cases:
        rc, out, err = cli(argv, capsys)
        assert_one_line_error(rc, out, err, *needles)


def test_bad_json_yaml_name_line(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text('{\n  "hidden_size": 64,\n  oops\n}\n')
    rc, out, err = cli(["estimate", "--hf-config", cfg, "--tokens", "1e9", "--gpus", "8", "--json"], capsys)
    assert_one_line_error(rc, out, err, f"{cfg}:3:", "not valid JSON")
    assert out == ""
    mix = tmp_path / "m.yaml"
    mix.write_text("alpha: 0.5\nsources: [\n  - {name: a\n")
    rc, out, err = cli(["mixture", "report", "--mixture", mix, "--seq-len", "8", "--train-samples", "8"], capsys)
    assert_one_line_error(rc, out, err, str(mix), "not valid YAML")
    mix.write_text("alpah: 0.5\nsources: [{name: a, group: domain, prefix: p}]\n")
    rc, out, err = cli(["mixture", "report", "--mixture", mix, "--seq-len", "8", "--train-samples", "8"], capsys)
    assert_one_line_error(rc, out, err, str(mix), "alpah", "docs/mixtures.md")


def test_corrupt_run_logs_for_select_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "evals.jsonl").write_text('{"step": 0, "results": {}}\n{"step": 4, "resu')
    rc, out, err = cli(["select", "--run", run], capsys)
    assert_one_line_error(rc, out, err, f"{run / 'evals.jsonl'}:2", "not valid JSON", "delete that line")
    (run / "evals.jsonl").unlink()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe\n')
    rc, out, err = cli(["plot", "--run", run], capsys)
    assert_one_line_error(rc, out, err, f"{run / 'metrics.jsonl'}:2", "not UTF-8")
    assert not (run / "plots" / "loss.png").exists()


def test_select_weights_value(tmp_path, capsys):
    rc, out, err = cli(["select", "--run", tmp_path, "--weights", "domain=x"], capsys)
    assert_one_line_error(rc, out, err, "domain='x'", "not a number", "domain=1,general=2")


def test_empty_and_fake_gguf(tmp_path, capsys):
    empty = tmp_path / "m.gguf"
    empty.write_bytes(b"")
    rc, out, err = cli(["import-hf", "--gguf", empty, "--out", tmp_path / "ck"], capsys)
    assert_one_line_error(rc, out, err, str(empty), "is empty", "not a GGUF")
    assert not (tmp_path / "ck").exists()
    empty.write_bytes(PNG)
    rc, out, err = cli(["preprocess", "--input", empty, "--tokenizer", empty, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "Traceback" not in err  # the PNG input is refused first; a .gguf tokenizer is checked too
    from cpt_megatron.tokenizer.load import load_tokenizer

    with pytest.raises(CptError, match="does not start with the GGUF magic"):
        load_tokenizer(str(empty), cache=False)


def test_eval_data_reader_names_file_and_line(tmp_path, png):
    from cpt_megatron.eval.perplexity import read_documents

    latin = tmp_path / "wiki.txt"
    latin.write_bytes(b"a\nb\ncaf\xe9\n")
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    for path, needle in ((png, "is a PNG image"), (latin, f"{latin}:3: not UTF-8"), (bad, f"{bad}:2: not valid JSON")):
        with pytest.raises(CptError, match=re.escape(needle)):
            list(read_documents(path))


# ---------------------------------------------------------------------------------------------------
# item 7: binary input refused consistently; empty JSONL to preprocess refused


def test_binary_inputs_refused_by_curate_and_tokenizer(tmp_path, png, capsys):
    rc, out, err = cli(["curate", "-i", png, "-o", tmp_path / "cur", "--no-progress", "--json"], capsys)
    assert_one_line_error(rc, out, err, str(png), "PNG image")
    assert out == "" and not (tmp_path / "cur").exists()
    rc, out, err = cli(["tokenizer", "analyze", "-t", "unused", "-i", png], capsys)
    assert_one_line_error(rc, out, err, str(png), "PNG image")


def test_extend_refuses_png(tmp_path, png, gpt2_tokenizer_dir, capsys):
    rc, out, err = cli(["tokenizer", "extend", "-t", gpt2_tokenizer_dir, "-i", png, "--add", "10", "-o", tmp_path / "o"],
                       capsys)
    assert_one_line_error(rc, out, err, str(png), "PNG image")
    assert not (tmp_path / "o").exists()


def test_preprocess_refuses_empty_text_and_zero_documents(tmp_path, gpt2_tokenizer_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    text = tmp_path / "notes.txt"
    text.write_text("plain text\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": ""}\n')
    for inp, needles in ((empty, [str(empty), "is empty"]), (text, [f"{text}:1", "JSONL", "cpt curate"]),
                         (blank, ["no documents", "nothing written", "--json-keys"])):
        out_prefix = tmp_path / f"o_{inp.stem}"
        rc, out, err = cli(["preprocess", "--input", inp, "--tokenizer", gpt2_tokenizer_dir, "--out", out_prefix,
                            "--no-progress", "--json"], capsys)
        assert_one_line_error(rc, out, err, *needles)
        assert out == "" and not list(tmp_path.glob(f"o_{inp.stem}*")), list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# item 9: --nproc defaults to tp*pp outside a launcher


def test_nproc_defaults_to_tp_pp(monkeypatch):
    from cpt_megatron.runtime import launch

    calls = []
    monkeypatch.setattr(launch, "relaunch", lambda n, argv: calls.append(n) or 0)
    for k in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    assert launch.relaunched(None, default=1) is False and calls == []
    assert launch.relaunched(None, default=4) is True and calls == [4]
    assert launch.relaunched(8, default=4) is True and calls == [4, 8]
    with pytest.raises(CptError, match=r"--nproc 3 is not a multiple of tp\*pp = 2"):
        launch.relaunched(3, default=2)
    monkeypatch.setenv("RANK", "0")
    assert launch.relaunched(None, default=4) is False  # under torchrun/srun: run here


def test_nproc_non_multiple_is_refused_before_spawning(capsys):
    rc, out, err = cli(["verify", "--hf", "h", "--ckpt", "c", "--tp", "2", "--nproc", "3"], capsys)
    assert_one_line_error(rc, out, err, "--nproc 3", "tp*pp = 2")


def test_readme_tp_examples_fit_smollm2():
    """SmolLM2-135M (the shipped model) has 3 KV heads: every README verify/eval --tp must divide 3."""
    readme = (REPO / "README.md").read_text()
    # the quick-start examples (the Commands table) run on SmolLM2; the benchmark section's CKPT is any model
    table = readme[readme.index("## Commands"):readme.index("### Training")]
    tps = [int(m) for m in re.findall(r"cpt (?:verify|eval) [^`]*?--tp (\d+)", table)]
    assert tps and all(3 % tp == 0 for tp in tps), tps


def test_mixture_missing_dataset_names_source(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{name: med, group: domain, prefix: {tmp_path / 'nope'}}}\nalpha: 1.0\n")
    rc, out, err = cli(["mixture", "report", "--mixture", mix, "--seq-len", "8", "--train-samples", "8"], capsys)
    assert_one_line_error(rc, out, err, str(mix), "'med'", f"{tmp_path / 'nope'}.bin/.idx not found", "cpt preprocess")


def test_curate_warns_when_a_big_text_file_is_one_document(tmp_path, capsys):
    big = tmp_path / "corpus.txt"
    big.write_text("# Doc\nSome words about medicine and health.\n" * 3000)
    rc, out, err = cli(["curate", "-i", big, "-o", tmp_path / "cur", "--stages", "normalize", "--no-progress",
                        "--json"], capsys)
    assert rc == 0, err
    assert f"{big} is plain text and is read as ONE document" in err and "--doc-separator" in err
    assert json.loads(out.strip().splitlines()[-1])["read"] == 1
    rc, out, err = cli(["curate", "-i", big, "-o", tmp_path / "cur2", "--stages", "normalize", "--no-progress",
                        "--doc-separator", "^# ", "--json"], capsys)
    assert rc == 0 and "ONE document" not in err
    assert json.loads(out.strip().splitlines()[-1])["read"] == 3000


# ---------------------------------------------------------------------------------------------------
# issue 28 item 6: silently ignored or misleading input


def test_mixture_yaml_typo_names_the_key_not_a_python_typeerror(tmp_path, capsys):
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{name: med, grop: domain, prefix: {tmp_path / 'x'}}}\n")
    rc, out, err = cli(["mixture", "report", "--mixture", mix, "--seq-len", "8", "--train-samples", "8"], capsys)
    last = assert_one_line_error(rc, out, err, "mixture.sources[0]", "unknown key(s) grop", "valid keys", "group")
    assert "__init__" not in last and "keyword argument" not in last
    mix.write_text(f"sources:\n  - {{name: med, prefix: {tmp_path / 'x'}}}\n")
    rc, out, err = cli(["mixture", "report", "--mixture", mix, "--seq-len", "8", "--train-samples", "8"], capsys)
    assert_one_line_error(rc, out, err, "mixture.sources[0]", "missing required key(s) group")


def test_empty_or_partial_recipe_is_one_line_not_init_message(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    rc, out, err = cli(["train", "--recipe", empty, "--dry-run"], capsys)
    last = assert_one_line_error(rc, out, err, str(empty), "is empty", "model:", "train:")
    assert "__init__" not in last
    part = tmp_path / "part.yaml"
    part.write_text("model: {hf_config: x.json}\n")
    rc, out, err = cli(["train", "--recipe", part, "--dry-run"], capsys)
    last = assert_one_line_error(rc, out, err, "missing required key(s) train")
    assert "__init__" not in last and "keyword-only" not in last


def test_curate_empty_file_is_an_error_not_kept_0(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, out, err = cli(["curate", "-i", empty, "-o", tmp_path / "cur", "--no-progress"], capsys)
    assert_one_line_error(rc, out, err, str(empty), "is empty")
    assert "kept 0" not in out and not (tmp_path / "cur").exists()


def test_curate_zip_is_refused_without_the_one_document_warning(tmp_path, capsys):
    z = tmp_path / "corpus.zip"
    z.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 400)  # > 64 KiB: the size that triggers the warning
    rc, out, err = cli(["curate", "-i", z, "-o", tmp_path / "cur", "--no-progress"], capsys)
    assert_one_line_error(rc, out, err, str(z), "zip archive")
    assert "ONE document" not in err, err


def test_preprocess_directory_input_says_directory_not_not_found(tmp_path, capsys):
    d = tmp_path / "curated"
    d.mkdir()
    rc, out, err = cli(["preprocess", "--input", d, "--tokenizer", tmp_path, "--out", tmp_path / "o"], capsys)
    last = assert_one_line_error(rc, out, err, str(d), "is a directory", "jsonl")
    assert "not found" not in last


@pytest.mark.parametrize("argv", [["curate", "-i", "x.jsonl", "-o", "o", "-c", "{d}"], ["train", "--recipe", "{d}", "--dry-run"],
                                  ["eval", "--data", "{d}", "--hf", "h"]])
def test_a_directory_where_a_file_is_expected_says_so(tmp_path, capsys, argv):
    d = tmp_path / "somedir"
    d.mkdir()
    rc, out, err = cli([a.format(d=d) for a in argv], capsys)
    last = assert_one_line_error(rc, out, err, str(d), "is a directory")
    assert "not found" not in last


def test_max_docs_applies_to_file_inputs(tmp_path):
    """demo_medical's max_docs: 1500 was ignored for its .txt input (curate read all 5486 documents)."""
    from cpt_megatron.curate.config import InputConfig
    from cpt_megatron.curate.readers import Doc, DocumentReader

    txt = tmp_path / "qa.txt"
    txt.write_text("".join(f"# Q{i}\nanswer {i}\n" for i in range(50)))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    docs = [r for r in DocumentReader([txt, jsonl], InputConfig(doc_separator="^# ", max_docs=60)) if isinstance(r, Doc)]
    assert len(docs) == 60 and docs[49].text.startswith("# Q49") and docs[-1].text == "doc 9"
    with pytest.raises(CptError, match="max_docs"):
        InputConfig(max_docs=0)
    # the recipe's max_docs reaches curation (train/prepare.py builds the InputConfig from the source)
    from cpt_megatron.config import load_recipe

    src = load_recipe("demo_medical").data.sources[0]
    assert src.max_docs == 1500 and not src.inputs[0].startswith("@")
    import inspect

    from cpt_megatron.train import prepare

    assert "max_docs=s.max_docs" in inspect.getsource(prepare.prepare_sources)
