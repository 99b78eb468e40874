"""A plain-text file cut into byte ranges (`readers.FilePart`): each range holds the documents whose first
line starts in it, with the whole file's line numbers, so the ranges together read exactly what one
reader reads, and `--shards N` on one text file equals the one-process run for any N."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from cpt_megatron.curate import curate, load_config
from cpt_megatron.curate.config import InputConfig
from cpt_megatron.curate.distributed import run_stage, shard_files
from cpt_megatron.curate.readers import DocumentReader, FilePart

_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()

# every corner the splitter has: text before the first separator, blank lines and blank documents,
# CRLF, an undecodable line inside a document, a separator line on the last line without a newline
_TEXT = (b"preamble line one\nstill the preamble\n\n# Doc A\nbody a1\nbody a2\n\n# Doc B\r\nbody b\r\n# \n\n\n"
         b"# Doc C\nbad \xff byte here\nmore c\n# Doc D\n" + b"".join(b"line %d of d\n" % i for i in range(6))
         + b"# Doc E\n# Doc F\nlast words\n# Doc G")


def _records(files, sep: str) -> list[str]:
    return [repr(r) for r in DocumentReader(files, InputConfig(doc_separator=sep))]


@pytest.mark.parametrize("sep", [r"^# ", r"^", r"^# Doc [A-Z]$"])
def test_ranges_at_every_cut_read_what_the_whole_file_reads(tmp_path, sep):
    path = tmp_path / "corpus.txt"
    path.write_bytes(_TEXT)
    whole = _records([path], sep)
    assert any("Malformed" in r for r in whole) and len(whole) > 5
    n = len(_TEXT)
    for cut in range(n + 1):  # two ranges, cut at every byte
        assert _records([FilePart(path, 0, cut), FilePart(path, cut, n)], sep) == whole, cut
    rng = random.Random(0)
    for _ in range(200):  # 2 to 6 ranges at random cuts
        cuts = sorted(rng.sample(range(1, n), rng.randint(1, 5)))
        parts = [FilePart(path, lo, hi) for lo, hi in zip([0, *cuts], [*cuts, n])]
        assert _records(parts, sep) == whole, cuts


def _corpus(path: Path) -> None:
    """MedQuAD-like pages ('# ' headers), with exact and near copies of earlier pages, short pages the
    length filter drops, blank pages, and a preamble."""
    rng = random.Random(5)
    pages: list[str] = []
    out = ["Preamble text of the dump, long enough to be kept as a document of its own by the filters.\n\n"]
    for i in range(90):
        r = rng.random()
        if pages and r < 0.15:
            page = rng.choice(pages)  # an exact copy, header included
        elif pages and r < 0.35 and (long := [p for p in pages if len(p) > 40]):
            w = rng.choice(long).split(" ")
            w[rng.randrange(2, len(w))] = "edited"
            page = " ".join(w)
        elif r < 0.4:
            page = f"# Q{i}\nshort\n"
        else:
            page = f"# Question {i}\n" + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 90))) + "\n"
        pages.append(page)
        out.append(page + ("\n" if i % 3 else "") + ("# \n\n" if i % 17 == 0 else ""))
    path.write_text("".join(out))


def _kept(folder: Path) -> bytes:
    return b"".join(gzip.decompress(p.read_bytes()) for p in sorted(folder.glob("shard-*.jsonl.gz")))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_one_text_file_over_1_to_4_shards_equals_one_process(tmp_path):
    path = tmp_path / "pages.txt"
    _corpus(path)
    cfg = load_config(None, {"input": {"doc_separator": "^# "}, "length": {"min_chars": 40}, "shard_docs": 9,
                             "rejected_samples": 5})
    ref = curate([path], tmp_path / "ref", cfg)
    assert ref.removed["exact_dedup"] > 3 and ref.removed["minhash_dedup"] > 3 and ref.removed["length"] > 3
    for shards in (1, 2, 3, 4):
        parts = shard_files([path], shards, separated=True)
        if shards > 1:
            assert all(len(p) == 1 and isinstance(p[0], FilePart) for p in parts)
        out = tmp_path / f"out{shards}"
        run_stage([path], out, cfg, shards)
        report = json.loads((out / "report.json").read_text())
        assert _files(out) == _files(tmp_path / "ref"), shards  # shards, rejected samples, report.json
        assert report["read"] == ref.read
    assert shard_files([path], 3) == [[], [path], []]  # without a separator the file is one document


def test_jsonl_ranges_with_unicode_escapes(tmp_path):
    """JSONL written with ensure_ascii (\\u escapes for every non-ASCII character) read in byte ranges:
    the lone-surrogate check once reused the range's byte counter and crashed on such lines."""
    path = tmp_path / "u.jsonl"
    rows = [{"id": str(i), "text": f"caf\u00e9 na\u00efve \u0939\u093f\u0902\u0926\u0940 {i}"} for i in range(40)]
    rows[7]["text"] = "lone \ud800 surrogate"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = [repr(r) for r in DocumentReader([path])]
    assert "lone surrogate" in whole[7]
    n = path.stat().st_size
    for cut in range(0, n, 7):
        assert [repr(r) for r in DocumentReader([FilePart(path, 0, cut), FilePart(path, cut, n)])] == whole


@pytest.mark.parametrize("kind", ["jsonl", "text"])
def test_workers_read_byte_ranges_themselves_same_output(tmp_path, monkeypatch, kind):
    """-j 2+: the parent cuts splittable files into parts (line ends found and lines counted there) and
    each worker reads its part; the output equals -j 1's for any worker count, parts of any size."""
    import cpt_megatron.curate.pipeline as pipeline

    path = tmp_path / ("pages.txt" if kind == "text" else "pages.jsonl")
    _corpus(tmp_path / "pages.txt")
    if kind == "jsonl":  # the same pages as JSONL records without ids (named by line number)
        pages = (tmp_path / "pages.txt").read_text().split("# ")
        path.write_text("".join(json.dumps({"text": "# " + p}) + "\n" + ("\n" if i % 5 == 0 else "")
                                for i, p in enumerate(pages)))
    cfg = load_config(None, {"input": {"doc_separator": "^# "}, "length": {"min_chars": 40}, "shard_docs": 9,
                             "rejected_samples": 5})
    curate([path], tmp_path / "w1", cfg, workers=1)
    monkeypatch.setattr(pipeline, "_PART_BYTES", 1500)
    from cpt_megatron.curate.spill import Budget

    tasks = list(pipeline._tasks(DocumentReader([path], cfg.input), 2, Budget.of(None)))  # parts of _PART_BYTES
    assert len(tasks) > 5 and all(isinstance(t, FilePart) and t.first_line for t in tasks)
    for w in (2, 3):
        curate([path], tmp_path / f"w{w}", cfg, workers=w)
        assert _files(tmp_path / f"w{w}") == _files(tmp_path / "w1"), w
