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


def test_paired_perplexity_change_and_noise():
    """With per-window losses the change is exp(mean paired difference) - 1 with its paired stderr; a shift below
    twice that stderr is marked noise."""
    import math

    def src(losses):
        return {"ppl": math.exp(sum(losses) / len(losses)), "batch_losses": [[x, 512] for x in losses]}

    base = [3.0, 3.5, 2.5, 4.0, 3.2, 2.8]
    big = [x + 0.1 + 0.01 * (-1) ** i for i, x in enumerate(base)]  # +0.1 nats, tiny spread
    small = [x + 0.002 * (-1) ** i for i, x in enumerate(base)]  # mean shift 0: noise
    evals = {"base": {"domain": {"m": src(base)}, "general": {"g": src(base)}, "benchmarks": {}},
             "arm": {"domain": {"m": src(big)}, "general": {"g": src(small)}, "benchmarks": {}}}
    r = {x["arm"]: x for x in fx.rows(evals)}["arm"]
    assert r["domain"]["change"] == pytest.approx(math.expm1(0.1)) and not r["domain"]["noise"]
    assert r["domain"]["stderr"] == pytest.approx(math.exp(0.1) * 0.01 * math.sqrt(6 / 5) / math.sqrt(6), rel=1e-6)
    assert r["general"]["g"]["noise"] and abs(r["general_change"]["g"]) < 1e-3
    assert "± " in fx.table([*fx.rows(evals)], "cmd", None).splitlines()[3]


def test_general_text_split_is_disjoint_and_spread(shared_data, tmp_path):
    """The monitor / select sample and the reported test sample of a general corpus share no piece, and both come
    from all over the file (not its first pages)."""
    src = shared_data / "general" / "tinyshakespeare_input.txt"
    valid, test = fx.split_general(src, tmp_path, 16384)
    v, t, whole = valid.read_text(), test.read_text(), src.read_text()
    assert 60_000 < len(v) < 200_000 and 60_000 < len(t) < 200_000
    vs, ts = set(v.split("\n\n")), set(t.split("\n\n"))
    assert len(vs & ts) < 0.05 * len(ts)  # paragraphs repeat in plays ("Exeunt."); pieces do not
    assert whole.index(t[-200:]) > 0.9 * len(whole) and whole.index(v[:200]) < 0.1 * len(whole)


def test_dry_run_prints_every_arm_merge_and_eval(shared_data, tmp_path, capsys):
    assert fx.main(["--reduced", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for arm in ("alpha1.0", "alpha0.7", "alpha1.0+l2sp", "alpha1.0+adapt"):
        assert f"run.dir={tmp_path / arm} " in out
    assert "train.ewc.kind=l2sp" in out and "eval.monitor.policy=adapt" in out
    assert out.count(" merge --base ") == 3 and "--merge-grid 0.25,0.5,0.75" in out
    assert "--benchmark-data" in out and "arc_easy,hellaswag,piqa,sciq" in out and "--limit 100 " in out
    held = (tmp_path / "data" / "medquad_heldout.txt").read_text()
    train = (tmp_path / "data" / "medquad_train.txt").read_text()
    assert held.count("\n# ") + held.startswith("# ") == 150 and held[:50] not in train
    recipe = (tmp_path / "recipe.yaml").read_text()
    assert f"{tmp_path / 'data' / 'medquad_train.txt'}" in recipe
    # decisions (the monitor, cpt select) see the validation samples; the reported evals the test samples
    assert "tinyshakespeare_input_valid.txt" in recipe and "input_test.txt" not in recipe and "tokenized_test" not in recipe
    sel = next(line for line in out.splitlines() if " select " in line)
    assert "_valid.txt" in sel and "_test.txt" not in sel
    evals = [line for line in out.splitlines() if " eval " in line and "--group general" in line]
    assert len(evals) == 8 and all("_test.txt" in e and "_valid.txt" not in e for e in evals)
