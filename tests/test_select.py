"""`cpt select` and `cpt plot` on a synthetic run directory (the layout the training driver writes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_megatron.cli import main
from cpt_megatron.eval.select import pareto_front, parse_weights, select_checkpoint

# step: (domain ppl, general ppl); base 20 / 10
EVALS = {0: (20.0, 10.0), 10: (18.0, 10.1), 20: (16.0, 10.2), 30: (15.0, 10.5), 40: (14.0, 10.25), 50: (17.0, 10.4)}


def _make_run(root: Path, ckpt_steps=(10, 20, 30, 40, 50), extra_eval_steps=(5,)) -> Path:
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    with open(run / "evals.jsonl", "w") as f:
        for step in sorted(set(EVALS) | set(extra_eval_steps)):
            dom, gen = EVALS.get(step, (19.0, 10.0))
            f.write(json.dumps({"step": step, "results": {
                "med": {"group": "domain", "loss": 0, "ppl": dom, "tokens": 100, "bits_per_byte": 1.0},
                "wiki": {"group": "general", "loss": 0, "ppl": gen, "tokens": 100, "bits_per_byte": 1.0}}}) + "\n")
    for s in ckpt_steps:
        (run / "checkpoints" / f"iter_{s:07d}").mkdir()
    (run / "checkpoints" / "latest").write_text(f"iter_{max(ckpt_steps):07d}\n")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 51):
            f.write(json.dumps({"step": s, "loss": 3 - s / 50, "lr": 1e-3 * min(1, s / 5), "grad_norm": 1.0,
                                "tokens_per_s": 1000}) + "\n")
    with open(run / "events.jsonl", "w") as f:
        f.write(json.dumps({"step": 30, "kind": "act", "action": "rollback", "metric": "ppl", "source": "wiki",
                            "value": 10.5, "baseline": 10.0, "regression": 0.05, "threshold": 0.03,
                            "params": {"lr_factor": 0.5}}) + "\n")
    (run / "config.yaml").write_text("eval:\n  interval: 10\n  monitor: {policy: rollback, warn: 0.02, act: 0.04}\n")
    return run


def test_pareto_front():
    pts = [(0.1, 0.01), (0.2, 0.02), (0.15, 0.03), (0.25, 0.05), (0.05, 0.05)]
    assert pareto_front(pts) == [True, True, False, True, False]


def test_select_ranks_under_limit_and_writes_files(tmp_path):
    run = _make_run(tmp_path)
    res = select_checkpoint(run, max_general_regression=0.03)
    # feasible (gen reg <= 3%): 10 (+10% dom), 20 (+20%), 40 (+30%, 2.5% reg); 30 and 50 exceed
    assert res["best"] == "iter_0000040" and res["step"] == 40
    assert [c["step"] for c in res["candidates"]] == [40, 20, 10, 30, 50]
    by = {c["step"]: c for c in res["candidates"]}
    assert by[40]["domain_gain"] == pytest.approx(0.30) and by[40]["general_regression"] == pytest.approx(0.025)
    assert {s for s, c in by.items() if c["pareto"]} == {10, 20, 40}  # 30 is dominated by 40 (more gain, less reg)
    assert not by[30]["feasible"] and by[10]["feasible"]
    assert 5 not in by  # evaluated but not saved: not a candidate
    assert (run / "best").read_text().strip() == "iter_0000040"
    md = (run / "selection.md").read_text()
    assert "| 1 | iter_0000040 | 40 | +30.00% | +2.50% |" in md
    assert (run / "selection.png").stat().st_size > 1000
    # a tighter limit changes the choice; weights rank by the composite
    assert select_checkpoint(run, max_general_regression=0.015)["best"] == "iter_0000010"
    w = select_checkpoint(run, max_general_regression=0.03, weights=parse_weights("domain=1,general=20"))
    assert w["best"] == "iter_0000010"  # 0.1 - 20*0.01 = -0.1 beats 0.2 - 0.4 and 0.3 - 0.5


def test_select_cli_json_and_no_feasible(tmp_path, capsys):
    run = _make_run(tmp_path)
    assert main(["select", "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["best"] == "iter_0000040" and out["step"] == 40 and len(out["candidates"]) == 5
    assert main(["select", "--run", str(run), "--max-general-regression", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint keeps the general regression <= 0.1%" in err and "iter_0000010" in err
    # issue 16: a failed selection leaves the previous result (best and report) in place
    assert (run / "best").read_text().strip() == "iter_0000040"
    assert "Best: **iter_0000040**" in (run / "selection.md").read_text()


def test_select_errors(tmp_path, capsys):
    assert main(["select", "--run", str(tmp_path)]) == 2
    assert "evals.jsonl not found" in capsys.readouterr().err
    run = _make_run(tmp_path, ckpt_steps=(7,))
    assert main(["select", "--run", str(run)]) == 2
    assert "no saved checkpoint has an evaluation" in capsys.readouterr().err
    with pytest.raises(ValueError, match="domain=W"):
        parse_weights("dom=1")


def test_plot_run(tmp_path, capsys):
    run = _make_run(tmp_path)
    assert main(["plot", "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(Path(p).name for p in out["plots"]) == ["evals.png", "loss.png"]
    assert out["events"] == 1 and out["evals"] == 7
    from cpt_megatron.eval.plot import run_thresholds

    assert run_thresholds(run) == (0.02, 0.04)
