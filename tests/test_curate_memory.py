"""Bounded memory (`memory_mb`, curate/spill.py): peak RSS of a whole `cpt curate` process stays under the
budget, and the outputs are byte-identical to the unbounded run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpt_megatron.curate.spill import SortedBands, SpillArray, SpillBytes

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
from cpt_megatron.curate import curate, load_config
cfg = load_config(None, json.loads(sys.argv[3]))
res = curate([sys.argv[1]], sys.argv[2], cfg, workers=int(sys.argv[4]))
# VmHWM: this process's peak RSS (ru_maxrss would also hold the forking pytest's size from before exec)
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
print(json.dumps({"maxrss_mib": hwm / 1024, "kept": res.kept}))
"""


def _corpus(path: Path, n_docs: int = 16_000, words: int = 120, seed: int = 3) -> None:
    """Random-vocabulary documents (~10 MB), every 10th a near copy (2 words changed) of an earlier one."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}x{'abcdefgh'[i % 8]}" for i in range(5000)])
    docs: list[str] = []
    with open(path, "w") as f:
        for i in range(n_docs):
            if i % 10 == 9:
                w = docs[int(rng.integers(len(docs)))].split()
                for k in rng.integers(0, len(w), 2):
                    w[k] = "edited"
                text = " ".join(w)
            else:
                text = " ".join(vocab[rng.integers(0, len(vocab), words)])
            docs.append(text)
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")


def _run(inp: Path, out: Path, memory_mb, workers: int = 1) -> dict:
    over = {"stages": ["normalize", "exact_dedup", "minhash_dedup"], "memory_mb": memory_mb}
    p = subprocess.run([sys.executable, "-c", _CHILD, str(inp), str(out), json.dumps(over), str(workers)],
                       cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                                      "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_peak_rss_stays_under_the_budget_and_outputs_equal_the_unbounded_run(tmp_path):
    inp = tmp_path / "in.jsonl"
    _corpus(inp)
    free = _run(inp, tmp_path / "free", None)
    bounded = _run(inp, tmp_path / "bounded", 64)
    assert free["maxrss_mib"] > 80, free  # the corpus needs more than the budget when nothing bounds it
    assert bounded["maxrss_mib"] <= 64, bounded  # measured 58 (Linux 6.18, ext4 large folios)
    assert bounded["kept"] == free["kept"] < 16_000
    assert _files(tmp_path / "bounded") == _files(tmp_path / "free")  # shards, rejected samples, report.json


def test_spill_array_and_bytes_grow_release_and_read_back(tmp_path):
    a, b = SpillArray(np.uint32, 3, str(tmp_path), capacity=2), SpillBytes(str(tmp_path))
    rows = np.arange(3 * 1000, dtype=np.uint32).reshape(-1, 3)
    for lo in range(0, 1000, 7):
        a.append(rows[lo : lo + 7])
        b.extend([f"doc:{i}".encode() for i in range(lo, min(lo + 7, 1000))])
        a.release()
        b.release()
    assert np.array_equal(a.view(), rows) and len(b) == 1000 and b[0] == b"doc:0" and b[999] == b"doc:999"
    assert list(tmp_path.iterdir()) == []  # nameless files
    a.close()
    b.close()


@pytest.mark.parametrize("resident", [1 << 16, 1 << 30])  # spilled runs / all runs in memory
def test_sorted_bands_answer_like_a_dict(tmp_path, resident):
    rng = np.random.default_rng(0)
    bands, table, row = SortedBands(str(tmp_path), resident), {}, 0
    for _ in range(60):
        keys = rng.integers(0, 3000, (rng.integers(1, 200), 4)).astype(np.uint64)
        doc, got = bands.query(keys)
        want = sorted((d, r) for d, ks in enumerate(keys.tolist()) for k in ks for r in table.get(k, []))
        assert sorted(zip(doc.tolist(), got.tolist())) == want
        rows = np.arange(row, row + len(keys))
        bands.insert(rows, keys)
        for r, ks in zip(rows.tolist(), keys.tolist()):
            for k in ks:
                table.setdefault(k, []).append(r)
        row += len(keys)
        bands.release()
    assert len(bands._runs) <= 2 * np.log2(row) + 2
    bands.close()


def _rss_file_mib() -> float:
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("RssFile")) / 1024


def test_a_query_reads_the_blocks_it_needs_not_the_spilled_run(tmp_path):
    """A spilled run is read block by block with pread: a query of 2,000 needles over a 32 MiB run maps
    none of it (a binary search through the map faulted in 64 KiB around every page it touched: the
    whole run) and answers like the run in memory."""
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 1 << 62, 1 << 21).astype(np.uint64)
    spilled, held = SortedBands(str(tmp_path), 1 << 16), SortedBands(str(tmp_path), 1 << 40)
    for lo in range(0, len(keys), 1 << 20):
        for bands in (spilled, held):
            bands.insert(np.arange(lo, lo + (1 << 20)), keys[lo : lo + (1 << 20)])
    spilled.release()
    assert len(spilled._runs) == 1 and spilled._runs[0][2] is not None  # one spilled run
    needles = np.concatenate([keys[rng.integers(0, len(keys), 1000)], rng.integers(0, 1 << 62, 1000).astype(np.uint64)])
    before = _rss_file_mib()
    doc, row = spilled.query(needles)
    assert _rss_file_mib() - before < 1.0
    want = held.query(needles)
    assert sorted(zip(doc.tolist(), row.tolist())) == sorted(zip(want[0].tolist(), want[1].tolist()))
    assert len(doc) >= 1000
    spilled.close()
    held.close()


def test_exact_keys_are_decided_across_batches_and_within_one(tmp_path):
    from cpt_megatron.curate.config import load_config
    from cpt_megatron.curate.pipeline import _LocalDedup, _Out
    from cpt_megatron.curate.spill import Budget

    cfg = load_config(None, {"stages": ["exact_dedup"]})
    dedup = _LocalDedup(cfg, tmp_path, tmp_path / "out", Budget.of(48.0))
    texts = [f"doc {i % 700}" for i in range(3000)]  # each text first at i < 700, then repeated
    got = []
    for lo in range(0, len(texts), 128):
        outs = [_Out(str(i), "s", i, t, []) for i, t in enumerate(texts[lo : lo + 128], lo)]
        for o in outs:
            o.exact = __import__("cpt_megatron.curate.dedup", fromlist=["exact_key"]).exact_key(o.text)
        got += dedup.exact_dups(outs)
    assert got == [i >= 700 for i in range(3000)]
    dedup.close()


_FAULTS = """
import resource, sys
import numpy as np
from cpt_megatron.runtime.procs import keep_freed_heap
ok = keep_freed_heap() if sys.argv[1] == "1" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(200):
    a = np.ones((1 << 17) + 512 * i)  # 1 MiB temporaries, each a little bigger (glibc's dynamic threshold
    del a  # then maps every one afresh), as the curation loop's batches make
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_heap_stops_a_page_fault_per_page_of_every_temporary():
    def faults(on: str) -> tuple[str, int]:
        p = subprocess.run([sys.executable, "-c", _FAULTS, on], capture_output=True, text=True, cwd=REPO,
                           env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0, p.stderr
        ok, n = p.stdout.split()
        return ok, int(n)

    (_, plain), (ok, kept) = faults("0"), faults("1")
    assert ok == "True"
    assert plain > 200 * 200  # each 1 MiB temporary: a fresh map, 256 faulted pages
    assert kept < 1000, (plain, kept)
