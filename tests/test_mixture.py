"""Mixtures: realized alpha, exact curriculum switch, stable prefix under with_extra_phase, validation, checks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cpt_megatron.errors import CptError

torch = pytest.importorskip("torch")
from cpt_megatron.data import preprocess as pp  # noqa: E402
from cpt_megatron.data.mixture import (  # noqa: E402
    MixtureConfig,
    PhaseConfig,
    SourceConfig,
    build_mixture,
    check_dataset_tokenizer,
    with_extra_phase,
)

SEQ = 64


@pytest.fixture(scope="module")
def gloo():
    """1-rank gloo group: megatron's cache paths call torch.distributed like a real run."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        yield
        dist.destroy_process_group()
    else:
        yield


@pytest.fixture(scope="module")
def sources(shared_data, gpt2_tokenizer_dir, tmp_path_factory):
    import os

    d = tmp_path_factory.mktemp("mix")
    os.environ.setdefault("CPT_CACHE_DIR", str(d / "cache"))
    text = (shared_data / "domain" / "medquad_qa.txt").read_text()[:800_000]
    med = [x for x in re.split(r"(?m)^(?=# )", text) if x.strip()]
    wiki = (shared_data / "general" / "wikitext2_raw_test.txt").read_text().split("\n")
    gen = ["\n".join(wiki[i : i + 25]) for i in range(0, len(wiki), 25)]
    out = {}
    for name, docs in (("med", med), ("wiki", gen)):
        src = d / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        pp.preprocess(pp.PreprocessConfig(inputs=[str(src)], tokenizer=str(gpt2_tokenizer_dir), out=str(d / name),
                                          append_eod=True, progress=False))
        out[name] = str(d / name)
    return out


def _cfg(sources, **kw):
    return MixtureConfig(sources=[SourceConfig(name="med", prefix=sources["med"], group="domain"),
                                  SourceConfig(name="wiki", prefix=sources["wiki"], group="general")], **kw)


def _build(cfg, tmp_path, n=10_000):
    return build_mixture(cfg, seq_len=SEQ, train_samples=n, valid_samples=16, cache_dir=str(tmp_path / "cache"),
                         tokenizer_vocab_size=50257, eod_id=50256)


def test_alpha_realized_and_valid_sets(sources, tmp_path, gloo):
    mix = _build(_cfg(sources, alpha=0.7), tmp_path)
    rep = mix.report()
    assert len(mix.train) == 10_000 and mix.phase_boundaries == [0, 10_000]
    assert abs(rep["groups"]["domain"] - 0.70) <= 0.01
    assert sum(s["tokens"] for s in rep["sources"].values()) == 10_000 * SEQ
    item = mix.train[123]
    assert set(item) >= {"tokens", "labels", "loss_mask", "position_ids", "source"}
    assert "attention_mask" not in item and item["tokens"].shape == (SEQ,)
    assert mix.source_names[item["source"]] in ("med", "wiki")
    assert set(mix.valid) == {"med", "wiki"} and len(mix.valid["med"]) >= 16
    # validation tokens come from the held-out tail: the last documents of the source
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(sources["med"])
    tail = np.concatenate([ds[i] for i in range(len(ds) - max(1, round(len(ds) * 0.02)), len(ds))])
    v = mix.valid["med"][0]["tokens"].numpy()
    assert any(np.array_equal(tail[j : j + 8], v[:8]) for j in range(len(tail) - 8))


def test_curriculum_switches_exactly_and_extra_phase_keeps_prefix(sources, tmp_path, gloo):
    cfg = _cfg(sources, phases=[PhaseConfig(until=0.3, alpha=0.5), PhaseConfig(alpha=0.9)])
    mix = _build(cfg, tmp_path)
    assert mix.phase_boundaries == [0, 3000, 10_000]
    di = np.asarray(mix.train.dataset_index)
    med = mix.source_names.index("med")
    assert (di[:3000] == med).mean() == pytest.approx(0.5, abs=1e-3)
    assert (di[3000:] == med).mean() == pytest.approx(0.9, abs=1e-3)
    # exact switch: the greedy blend of phase 2 restarts at sample 3000 (first pick = heaviest source)
    assert (di[3000:3010] == med).sum() == 9
    ph = mix.report()["phases"]
    assert [p["domain_share"] for p in ph] == pytest.approx([0.5, 0.9], abs=1e-3)

    adapted = with_extra_phase(cfg, 6000, 10_000, 0.2)
    mix2 = _build(adapted, tmp_path)
    assert mix2.phase_boundaries == [0, 3000, 6000, 10_000]
    di2 = np.asarray(mix2.train.dataset_index)
    assert np.array_equal(di2[:6000], di[:6000])
    assert (di2[6000:] == med).mean() == pytest.approx(0.2, abs=1e-3)
    for i in (0, 2999, 3000, 5999):
        assert torch.equal(mix2.train[i]["tokens"], mix.train[i]["tokens"])


def test_token_budget_and_epoch_warning(sources, tmp_path, gloo):
    cfg = MixtureConfig(sources=[SourceConfig(name="med", prefix=sources["med"], group="domain"),
                                 SourceConfig(name="wiki", prefix=sources["wiki"], group="general", tokens=10_000),
                                 SourceConfig(name="wiki2", prefix=sources["wiki"], group="general", weight=1.0)],
                        alpha=0.5, max_epochs_warn=0.5)
    rep = _build(cfg, tmp_path, n=4000).report()
    # general group = 0.5 * 4000 * 64 = 128,000 tokens; wiki's budget is 10,000 of them
    assert abs(rep["sources"]["wiki"]["tokens"] - 10_000) <= 2 * SEQ
    for name, src in rep["sources"].items():
        assert (src["epochs"] > 0.5) == any(f"'{name}'" in w for w in rep["warnings"])


def test_config_and_tokenizer_errors(sources, tmp_path):
    with pytest.raises(ValueError, match="until"):
        _cfg(sources, phases=[PhaseConfig(until=0.5), PhaseConfig(until=0.4)])
    with pytest.raises(ValueError, match="no general source"):
        MixtureConfig(sources=[SourceConfig(name="m", prefix=sources["med"], group="domain")], alpha=0.7)
    with pytest.raises(ValueError, match="group"):
        SourceConfig(name="x", prefix="p", group="replay")
    with pytest.raises(CptError, match="vocab size 32000"):
        check_dataset_tokenizer(sources["med"], 32000)
    with pytest.raises(CptError, match="differs from the model's tokenizer"):
        check_dataset_tokenizer(sources["med"], 50257, {"tokenizer.json": "0" * 64})
    with pytest.raises(CptError, match="not found"):
        check_dataset_tokenizer(str(tmp_path / "nope"), 50257)
    assert check_dataset_tokenizer(sources["med"], 50257)["tokenizer"]["eod_id"] == 50256


def test_cli_report(sources, tmp_path, capsys):
    from cpt_megatron.cli import main

    y = tmp_path / "mix.yaml"
    y.write_text(f"sources:\n  - {{name: med, prefix: {sources['med']}, group: domain}}\n"
                 f"  - {{name: wiki, prefix: {sources['wiki']}, group: general}}\n"
                 "alpha: 0.7\nphases: [{until: 0.5, alpha: 0.6}, {alpha: 0.8}]\n")
    png = tmp_path / "mix.png"
    rc = main(["mixture", "report", "--mixture", str(y), "--seq-len", "64", "--train-samples", "2000",
               "--png", str(png), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["groups"]["domain"] == pytest.approx(0.7, abs=0.01) and png.stat().st_size > 1000
