"""experiments/forgetting.py: the report (changes vs the base, benchmark deltas with the stderr of the difference,
noise marking, the Pareto plot) on constructed evaluations, and the dry run's commands (nothing trained)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import forgetting as fx  # noqa: E402


def _ev(dom, gut, shk, arc, se=0.01):
    return {"domain": {"medquad_heldout": dom}, "general": {"gutenberg": gut, "tinyshakespeare": shk},
            "benchmarks": {"arc_easy": {"acc": arc, "acc_stderr": se, "n": 1000, "split": "test"}}}


def test_rows_table_and_pareto(tmp_path):
    evals = {"base": _ev(10.0, 40.0, 50.0, 0.60), "alpha1.0": _ev(8.0, 44.0, 51.0, 0.55),
             "alpha0.7": _ev(8.5, 41.0, 50.5, 0.595), "merge λ=0.5": _ev(8.8, 40.4, 50.0, 0.60)}
    rs = {r["arm"]: r for r in fx.rows(evals)}
    a = rs["alpha1.0"]
    assert a["domain_change"] == pytest.approx(-0.2) and a["general_worst"] == pytest.approx(0.1)
    assert a["bench"]["arc_easy"]["delta"] == pytest.approx(-0.05)
    assert a["bench"]["arc_easy"]["delta_stderr"] == pytest.approx(0.01 * 2 ** 0.5)
    assert not a["bench"]["arc_easy"]["noise"] and rs["alpha0.7"]["bench"]["arc_easy"]["noise"]  # 0.005 < 2 x 0.014
    md = fx.table(list(rs.values()), "python experiments/forgetting.py --reduced", 0.5)
    assert "| alpha1.0 | 8.000 (-20.00%) | +10.00% | +2.00% | 0.5500 ± 0.0100 (-0.0500 ± 0.0141) |" in md
    assert "| merge λ=0.5 (picked) |" in md and "(-0.0050 ± 0.0141, noise)" in md
    fx.pareto(list(rs.values()), tmp_path / "p.png", 0.03, 0.5)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_dry_run_prints_every_arm_merge_and_eval(shared_data, tmp_path, capsys):
    assert fx.main(["--reduced", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for arm in ("alpha1.0", "alpha0.7", "alpha1.0+l2sp", "alpha1.0+adapt"):
        assert f"run.dir={tmp_path / arm} " in out
    assert "train.ewc.kind=l2sp" in out and "eval.monitor.policy=adapt" in out
    assert out.count(" merge --base ") == 3 and "--merge-grid 0.25,0.5,0.75" in out
    assert "--benchmark-data" in out and "arc_easy,hellaswag,piqa,sciq" in out and "--limit 1000" in out
    held = (tmp_path / "data" / "medquad_heldout.txt").read_text()
    train = (tmp_path / "data" / "medquad_train.txt").read_text()
    assert held.count("\n# ") + held.startswith("# ") == 150 and held[:50] not in train
    assert f"{tmp_path / 'data' / 'medquad_train.txt'}" in (tmp_path / "recipe.yaml").read_text()
