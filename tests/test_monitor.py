"""Forgetting monitor policy logic: thresholds, each policy's action, no action below threshold, no spam."""

from __future__ import annotations

import json

import pytest

from cpt_megatron.eval.monitor import Event, ForgettingMonitor, MonitorConfig, relative_regression

BASE = {
    "med": {"group": "domain", "ppl": 20.0},
    "wiki": {"group": "general", "ppl": 10.0, "bits_per_byte": 1.0},
    "books": {"group": "general", "ppl": 30.0},
    "arc": {"group": "general", "acc": 0.5, "acc_norm": 0.6},
}


def res(wiki=10.0, books=30.0, med=15.0, acc=0.5):
    return {"med": {"group": "domain", "ppl": med}, "wiki": {"group": "general", "ppl": wiki, "bits_per_byte": 1.0},
            "books": {"group": "general", "ppl": books}, "arc": {"group": "general", "acc": acc, "acc_norm": 0.6}}


def mon(**kw):
    return ForgettingMonitor(MonitorConfig(**kw), BASE)


def acted(events):
    return [e for e in events if e.action]


def test_config_validation_names_field():
    for kw, msg in (({"warn": 0.05, "act": 0.03}, "warn <= act"), ({"policy": "panic"}, "policy"),
                    ({"lr_factor": 0.0}, "lr_factor"), ({"replay_step": 1.5}, "replay_step"),
                    ({"metrics": ["bleu"]}, "metrics"), ({"cooldown_evals": -1}, "cooldown")):
        with pytest.raises(ValueError, match=msg):
            MonitorConfig(**kw)
    assert MonitorConfig(metrics="ppl").metrics == ["ppl"]


def test_relative_regression_direction():
    assert relative_regression("ppl", 10.3, 10.0) == pytest.approx(0.03)
    assert relative_regression("ppl", 9.0, 10.0) == pytest.approx(-0.1)
    assert relative_regression("acc", 0.45, 0.5) == pytest.approx(0.1)  # accuracy falling = regression
    assert relative_regression("acc_norm", 0.6, 0.5) == pytest.approx(-0.2)


def test_baseline_events_and_watched_pairs():
    m = mon(metrics=["ppl", "acc"])
    assert m.watched == [("arc", "acc"), ("books", "ppl"), ("wiki", "ppl")]  # domain never watched
    ev = m.observe(0, BASE)
    assert {e.kind for e in ev} == {"baseline"} and all(e.regression == 0 for e in ev)


@pytest.mark.parametrize("policy", ["warn", "stop", "rollback", "adapt"])
def test_below_threshold_no_action(policy):
    m = mon(policy=policy)
    ev = m.observe(10, res(wiki=10.1, books=30.5))  # +1%, +1.7%
    assert [e.kind for e in ev] == ["ok", "ok"] and not acted(ev)
    assert all(e.threshold is None for e in ev)


def test_threshold_crossing_levels():
    m = mon(policy="warn")
    ev = {e.source: e for e in m.observe(10, res(wiki=10.2, books=30.0))}  # exactly +2.0% -> warn
    assert ev["wiki"].kind == "warn" and ev["wiki"].threshold == 0.02 and ev["books"].kind == "ok"
    ev = {e.source: e for e in m.observe(20, res(wiki=10.3, books=30.9))}  # +3.0% each -> act level
    assert ev["wiki"].kind == "act" and ev["wiki"].threshold == 0.03
    assert not acted(ev.values())  # policy warn never acts


def test_stop_policy_acts_once():
    m = mon(policy="stop", cooldown_evals=0)
    ev = m.observe(10, res(wiki=10.5))
    (a,) = acted(ev)
    assert a.action == "stop" and a.source == "wiki" and a.params == {}
    ev = m.observe(20, res(wiki=10.6))
    assert not acted(ev) and ev[-1].params == {"suppressed": "already stopped"}


def test_rollback_policy_params_and_worst_metric_only():
    m = mon(policy="rollback", lr_factor=0.25)
    ev = m.observe(10, res(wiki=10.4, books=31.5))  # +4% and +5%: both act level, one action on the worst
    a = acted(ev)
    assert len(a) == 1 and a[0].source == "books" and a[0].action == "rollback" and a[0].params == {"lr_factor": 0.25}
    assert [e.kind for e in ev] == ["act", "act"]


def test_adapt_policy_params():
    ev = mon(policy="adapt", replay_step=0.2).observe(10, res(wiki=11.0))
    assert acted(ev)[0].params == {"alpha_delta": -0.2}
    ev = mon(policy="adapt", adapt_lr=True, lr_factor=0.5).observe(10, res(wiki=11.0))
    assert acted(ev)[0].params == {"alpha_delta": -0.1, "lr_factor": 0.5}


def test_cooldown_and_max_actions_prevent_spam():
    m = mon(policy="adapt", cooldown_evals=2, max_actions=2)
    actions = []
    for step in range(10, 90, 10):
        ev = m.observe(step, res(wiki=11.0))  # persistently above act
        actions.append([e.action for e in ev if e.action])
        assert sum(1 for e in ev if e.action) <= 1  # at most one action per evaluation
    # act at 10, cooldown 20-30, act at 40, then max_actions reached
    assert actions == [["adapt"], [], [], ["adapt"], [], [], [], []]
    last = m.observe(90, res(wiki=11.0))
    assert [e.params for e in last if e.kind == "act"] == [{"suppressed": "max_actions"}]
    assert m.num_actions == 2


def test_recovery_then_new_crossing_acts_again():
    m = mon(policy="rollback", cooldown_evals=1)
    assert acted(m.observe(10, res(wiki=10.5)))
    assert not acted(m.observe(20, res(wiki=10.0)))  # recovered (and in cooldown)
    assert acted(m.observe(30, res(wiki=10.5)))  # cooldown over: acts again


def test_accuracy_metric_and_missing_source():
    m = mon(policy="stop", metrics=["acc"])
    ev = m.observe(10, res(acc=0.48))  # 4% relative drop
    assert ev[0].source == "arc" and ev[0].kind == "act" and ev[0].action == "stop"
    with pytest.raises(ValueError, match="lacks 'ppl' for general source 'wiki'"):
        mon().observe(10, {"books": {"group": "general", "ppl": 30.0}})
    with pytest.raises(ValueError, match="no general source"):
        ForgettingMonitor(MonitorConfig(), {"med": {"group": "domain", "ppl": 2.0}})


def test_non_finite_value_is_act():
    ev = mon(policy="stop").observe(10, res(wiki=float("nan")))
    assert acted(ev)[0].source == "wiki" and acted(ev)[0].regression == float("inf")


def test_event_roundtrip_format_and_rollback_target():
    m = mon(policy="rollback")
    m.observe(10, res(wiki=10.1))
    m.observe(20, res(wiki=10.15))
    m.observe(30, res(wiki=10.25))  # warn level: not a rollback target
    ev = m.observe(40, res(wiki=10.4))
    a = acted(ev)[0]
    d = json.loads(json.dumps(a.to_dict()))
    assert Event.from_dict(d) == a
    assert set(d) == {"step", "kind", "action", "metric", "source", "value", "baseline", "regression", "threshold", "params",
                      "stderr"}
    line = a.format()
    assert line.startswith("step 40 ACT wiki ppl 10.4 vs 10") and "-> rollback lr_factor=0.5" in line
    assert m.rollback_target([10, 20, 30, 40]) == 20
    assert m.rollback_target([30, 40]) is None
