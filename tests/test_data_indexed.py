"""The streaming .bin/.idx writer is byte-identical to megatron-core's IndexedDatasetBuilder."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from cpt_megatron.data.indexed import IndexArrays, IndexWriter, merge_datasets, optimal_dtype


def _docs(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50000, rng.integers(1, 60)).astype(np.uint16) for _ in range(n)]


def test_bytes_match_megatron_builder_and_merge(tmp_path):
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    docs = _docs()
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for d in docs:
        ref.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    ref.finalize(str(tmp_path / "ref.idx"))

    with IndexWriter(tmp_path / "ours", np.uint16) as w:
        w.add_documents(np.concatenate(docs[:50]), [len(d) for d in docs[:50]])
        for d in docs[50:]:
            w.add_document(d)
        assert w.finalize()["documents"] == len(docs)
    for a, b in [("ref", "ours")]:
        assert filecmp.cmp(tmp_path / f"{a}.bin", tmp_path / f"{b}.bin", shallow=False)
        assert filecmp.cmp(tmp_path / f"{a}.idx", tmp_path / f"{b}.idx", shallow=False)

    for name, part in (("a", docs[:77]), ("b", docs[77:])):
        with IndexWriter(tmp_path / name, np.uint16) as w:
            for d in part:
                w.add_document(d)
            w.finalize()
    merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert filecmp.cmp(tmp_path / "ref.idx", tmp_path / "m.idx", shallow=False)
    assert filecmp.cmp(tmp_path / "ref.bin", tmp_path / "m.bin", shallow=False)
    ds = IndexedDataset(str(tmp_path / "m"))
    assert len(ds) == len(docs) and np.array_equal(ds[123], docs[123])
    assert IndexArrays(tmp_path / "m").num_tokens == sum(map(len, docs))


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexWriter(tmp_path / "x", np.int32) as w:
        w.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_optimal_dtype_matches_megatron():
    assert optimal_dtype(32000) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(128256) is np.int32
