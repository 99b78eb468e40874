"""`cpt mixture search`: the mixing law (eval/mixing_law.py), the recommendation, and the search on tiny_cpu."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import yaml
from conftest import cli

from cpt_megatron.errors import CptError
from cpt_megatron.eval.mixing_law import fit_exp_law, recommend, relative_change, token_exponent
from cpt_megatron.train import mixture_search
from cpt_megatron.train.mixture_search import analyze

ALPHAS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])




def one_line_error(rc, err, *needles) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


# -- the law ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c,k,t", [(2.0, 0.8, -1.5), (3.0, 0.05, 2.0), (1.5, -0.3, 0.7), (4.1, 0.02, 4.0)])
def test_law_recovers_known_parameters(c, k, t):
    law = fit_exp_law(ALPHAS, c + k * np.exp(t * ALPHAS))
    assert (law.c, law.k, law.t) == pytest.approx((c, k, t), rel=1e-5, abs=1e-7) and law.identified
    # noisy points: the estimate is within 3 standard errors of the truth, and the band is not degenerate
    rng = np.random.default_rng(0)
    x = np.repeat(ALPHAS, 3)
    noisy = fit_exp_law(x, c + k * np.exp(t * x) + rng.normal(0, 2e-3, x.size))
    se = np.sqrt(np.diag(noisy.cov))
    assert np.all(se > 0)
    assert np.all(np.abs(np.array([noisy.c, noisy.k, noisy.t]) - [c, k, t]) < 3 * se + 1e-9), (noisy, se)
    truth = c + k * np.exp(t * 0.6)
    assert abs(float(noisy(0.6)) - truth) < 3 * float(noisy.std(0.6))
    # three alphas: the law interpolates them exactly and predicts the others; no covariance (0 dof)
    three = fit_exp_law([0, 0.5, 1], c + k * np.exp(t * np.array([0, 0.5, 1])))
    assert three.cov is None and three.std(0.3) is None
    assert three(np.array([0.25, 0.75])) == pytest.approx(c + k * np.exp(t * np.array([0.25, 0.75])), rel=1e-7)


def test_law_refuses_too_few_or_bad_points():
    # not monotone in alpha (MedQuAD proxies of experiments/mixture_law.py): a step function, flagged
    step = fit_exp_law([0, 0.5, 1], [2.920, 2.720, 2.769])
    assert not step.identified and step.rss > 1e-4
    notes = analyze(_metrics(lambda a: 2.0 + 0.05 * math.exp(2.5 * a), lambda a: {0: 2.92, 0.5: 2.72, 1: 2.769}[a],
                             alphas=[0, 0.5, 1]), general=["wiki"], domain=["med"], watched=["ppl"], budget=0.03,
                    full_tokens=1000)["notes"]
    assert len(notes) == 1 and "'med': the law is not identified" in notes[0]
    with pytest.raises(CptError, match="2 distinct alpha.*at least 3"):
        fit_exp_law([0, 1, 1], [2.0, 2.1, 2.1])
    with pytest.raises(CptError, match="non-finite.*diverged"):
        fit_exp_law([0, 0.5, 1], [2.0, math.nan, 2.1])


def test_token_exponent_recovers_power_law():
    # dL(D) = a * D^0.4 for changes of either sign; tiny changes (noise) are left out
    pairs = [(a * 1000 ** 0.4, a * 4000 ** 0.4) for a in (-0.02, 0.01, 0.05)] + [(1e-6, -1e-6)]
    assert token_exponent(pairs, 4.0) == pytest.approx(0.4, abs=1e-9)
    assert token_exponent([(0.1, 0.1 * 4 ** 1.7)], 4.0) == 1.0  # clipped: faster than linear is not extrapolated
    assert token_exponent([(0.01, -0.01)], 4.0) is None
    assert token_exponent(pairs, 1.0) is None


def test_relative_change_is_the_monitors_regression():
    from cpt_megatron.eval.monitor import relative_regression

    base, loss = 2.3, 2.36
    for metric, value, v0 in (("ppl", math.exp(loss), math.exp(base)), ("loss", loss, base),
                              ("bits_per_byte", loss * 0.7, base * 0.7)):
        assert float(relative_change(metric, loss, base)) == pytest.approx(relative_regression(metric, value, v0))


# -- the recommendation -------------------------------------------------------------------------------------
def _metrics(general, domain, *, base_g=2.06, base_d=3.0, b=0.5, steps=10, tps=100, alphas=ALPHAS):
    """Proxy metrics from known laws: final losses on the laws, mid-run changes scaled by 0.5^b."""
    out = []
    for a in alphas:
        end = {"wiki": general(a), "med": domain(a)}
        base = {"wiki": base_g, "med": base_d}
        mid = {n: base[n] + (end[n] - base[n]) * 0.5 ** b for n in end}
        out.append({"alpha": float(a), "steps": steps, "tokens_per_step": tps,
                    "evals": {"0": {n: {"loss": base[n]} for n in base}, str(steps // 2): {n: {"loss": v} for n, v in mid.items()},
                              str(steps): {n: {"loss": v} for n, v in end.items()}}})
    return out


def test_recommendation_is_largest_alpha_within_budget_after_extrapolation():
    c, k, t = 2.0, 0.05, 2.5          # general loss rises with the domain share (forgetting)
    metrics = _metrics(lambda a: c + k * math.exp(t * a), lambda a: 2.4 + 0.6 * math.exp(-2 * a))
    full = 4 * 10 * 100                # 4x the proxy's tokens, b = 0.5: changes double
    res = analyze(metrics, general=["wiki"], domain=["med"], watched=["ppl"], budget=0.03, full_tokens=full)
    assert res["sets"]["wiki"]["token_exponent"] == pytest.approx(0.5, abs=1e-6)
    assert res["sets"]["wiki"]["token_factor"] == pytest.approx(2.0, rel=1e-6)
    exact = math.log((2.06 + math.log(1.03) / 2 - c) / k) / t   # exp(2 dL) - 1 = 3%
    assert res["alpha"] == pytest.approx(math.floor(exact * 100) / 100)
    pred = res["predicted"]
    assert 0.0 < pred["general_regression"] <= 0.03
    dl = 2 * (2.4 + 0.6 * math.exp(-2 * res["alpha"]) - 3.0)
    assert pred["domain_gain"] == pytest.approx(-math.expm1(dl), rel=1e-4)
    # without extrapolation (full run = proxy) the same budget allows more domain data
    res1 = analyze(metrics, general=["wiki"], domain=["med"], watched=["ppl"], budget=0.03, full_tokens=1000)
    assert res1["alpha"] == pytest.approx(math.floor(100 * math.log((2.06 + math.log(1.03) - c) / k) / t) / 100)
    # the half-way losses did not move (e.g. still in warmup): no exponent, no extrapolation, and it says so
    flat = analyze(_metrics(lambda a: c + k * math.exp(t * a), lambda a: 2.4 + 0.6 * math.exp(-2 * a), b=60),
                   general=["wiki"], domain=["med"], watched=["ppl"], budget=0.03, full_tokens=full)
    assert flat["extrapolation"]["exponents"] == {"general": None, "domain": None} and flat["alpha"] == res1["alpha"]
    assert len(flat["notes"]) == 2 and "not extrapolated" in flat["notes"][0]
    # the monitor watches loss instead of ppl: dL / L0 <= 3%
    res2 = analyze(metrics, general=["wiki"], domain=["med"], watched=["loss"], budget=0.03, full_tokens=1000)
    assert res2["alpha"] == pytest.approx(math.floor(100 * math.log((2.06 * 1.03 - c) / k) / t) / 100)


def test_recommendation_worst_general_set_and_infeasible_budget():
    metrics = _metrics(lambda a: 2.0 + 0.05 * math.exp(2.5 * a), lambda a: 2.4 + 0.6 * math.exp(-2 * a))
    for m in metrics:  # a second general set that forgets faster decides
        for ev in m["evals"].values():
            ev["books"] = {"loss": ev["wiki"]["loss"] * 1.5 - 1.03}
    one = analyze(metrics, general=["wiki"], domain=["med"], watched=["ppl"], budget=0.03, full_tokens=1000)
    both = analyze(metrics, general=["books", "wiki"], domain=["med"], watched=["ppl"], budget=0.03, full_tokens=1000)
    assert both["alpha"] < one["alpha"]
    none = analyze(_metrics(lambda a: 2.2 + 0.01 * a, lambda a: 2.9 - 0.1 * a, alphas=[0, 0.5, 1]), general=["wiki"],
                   domain=["med"], watched=["ppl"], budget=0.03, full_tokens=1000)
    assert none["alpha"] is None and not none["feasible"] and none["least_regressing"]["alpha"] == 0.0
    assert recommend(np.array([0.0, 0.5, 1.0]), np.array([0.01, 0.03, 0.02]), 0.03) == 1.0


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_one_line_nothing_written(tmp_path, capsys):
    out = tmp_path / "s"
    rc, _, err = cli(["mixture", "search", "--recipe", "tiny_cpu", "eval.general=[]", "--out", out], capsys)
    one_line_error(rc, err, "no general held-out set", "eval.general")
    rc, _, err = cli(["mixture", "search", "--recipe", "tiny_cpu", "--alphas", "0,1,1", "--out", out], capsys)
    one_line_error(rc, err, "--alphas 0,1,1", "at least 3")
    rc, _, err = cli(["mixture", "search", "--recipe", "tiny_cpu", "--alphas", "0,0.5,1.5", "--out", out], capsys)
    one_line_error(rc, err, "--alphas", "1.5")
    rc, _, err = cli(["mixture", "search", "--recipe", "tiny_cpu", "--proxy-model", tmp_path / "nope", "--out", out],
                     capsys)
    one_line_error(rc, err, "--proxy-model", "not found")
    assert not out.exists()


_FAKE_TRAIN = textwrap.dedent("""
    import json, math, os, sys
    args = sys.argv[1:]
    if args[0] == "prepare":
        open(os.environ["FAKE_PREPARED"], "a").write("prepare\\n")
        sys.exit(0)
    run = next(a.split("=", 1)[1] for a in args if a.startswith("run.dir="))
    alpha = float(next(a.split("=", 1)[1] for a in args if a.startswith("data.alpha=")))
    steps = int(next(a.split("=", 1)[1] for a in args if a.startswith("train.max_steps=")))
    os.makedirs(run, exist_ok=True)
    open(os.environ["FAKE_PREPARED"], "a").write(f"train {alpha:g}\\n")
    mode = os.environ["FAKE_MODE"]
    bad = alpha == 1.0
    if bad and mode == "crash":
        print("RuntimeError: planted crash", file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(run, "evals.jsonl"), "w") as f:
        for s in (0, steps // 2, steps):
            loss = float("nan") if (bad and mode == "nan" and s == steps) else 2.0 + 0.1 * alpha * s / steps
            f.write(json.dumps({"step": s, "results": {"stdlib": {"group": "domain", "loss": 3.0 - loss / 10},
                                                       "shakespeare": {"group": "general", "loss": loss}}}) + "\\n")
    print(json.dumps({"losses": [1.0], "stopped": "loss spike at step 2" if bad and mode == "stopped" else None}))
""")


@pytest.mark.parametrize("mode,needle", [("nan", "non-finite held-out loss"), ("stopped", "loss spike"),
                                         ("crash", "planted crash")])
def test_diverging_or_failing_proxy_is_one_line_and_finished_proxies_are_kept(tmp_path, capsys, monkeypatch,
                                                                            mode, needle):
    fake = tmp_path / "fake_cpt.py"
    fake.write_text(_FAKE_TRAIN)
    monkeypatch.setattr(mixture_search, "_cpt", lambda *argv: [sys.executable, str(fake), *argv])
    monkeypatch.setenv("FAKE_MODE", mode)
    monkeypatch.setenv("FAKE_PREPARED", str(tmp_path / "calls.txt"))
    out = tmp_path / "s"
    rc, _, err = cli(["mixture", "search", "--recipe", "tiny_cpu", "--alphas", "0,0.5,1", "--proxy-steps", "4",
                      "--out", out], capsys)
    one_line_error(rc, err, "proxy alpha=1", needle)
    assert not any((out / f).exists() for f in ("search.json", "search.png", "recommendation.yaml"))
    done = sorted(p.parent.name.split("-")[0] for p in out.glob("proxies/*/metrics.json"))
    assert done == ["alpha_0.000", "alpha_0.500"]          # kept for the next (resumed) search
    if mode != "nan":
        return
    monkeypatch.setenv("FAKE_MODE", "ok")
    rc, out_, err = cli(["mixture", "search", "--recipe", "tiny_cpu", "--alphas", "0,0.5,1", "--proxy-steps", "4",
                         "--out", out, "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out_.strip().splitlines()[-1])
    assert [p["reused"] for p in res["proxies"]] == [True, True, False]
    calls = ["prepare", "train 0", "train 0.5", "train 1", "prepare", "train 1"]   # finished proxies not rerun
    assert (tmp_path / "calls.txt").read_text().split("\n")[:-1] == calls
    rc, out_, err = cli(["mixture", "search", "--recipe", "tiny_cpu", "--alphas", "1,0.5,0", "--proxy-steps", "4",
                         "--out", out, "--json"], capsys)
    assert rc == 0, err
    assert (tmp_path / "calls.txt").read_text().split("\n")[:-1] == calls   # all reused: no prepare, no train


# -- the search on the tiny model ---------------------------------------------------------------------------
def test_search_tiny_cpu_plumbing_and_resume(tiny_cpu_cache, tmp_path, capsys):
    """Real proxies (cpt train, 2 steps each, 3 at a time; the session's tiny_cpu_cache is prepared) at 3 alphas, then a second search that reuses all of them
    (partial reuse, a new alpha beside finished ones, is in the fake-trainer test above)."""
    out = tmp_path / "search"
    common = ["mixture", "search", "--recipe", "tiny_cpu", f"data.cache_dir={tiny_cpu_cache}",
              f"run.dir={tmp_path / 'run'}", "--proxy-steps", "2", "--out", out, "--json"]
    rc, stdout, err = cli([*common, "--alphas", "0,0.5,1", "--jobs", "3", "--no-prepare"], capsys)
    assert rc == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert [p["reused"] for p in res["proxies"]] == [False] * 3
    full = json.loads((out / "search.json").read_text())
    assert res["alpha"] == full["alpha"] and res["extrapolation"]["proxy_tokens"] == 2 * 8 * 64
    assert res["extrapolation"]["full_tokens"] == 8 * 8 * 64 and res["extrapolation"]["factor_tokens"] == 4.0
    assert set(full["sets"]) == {"stdlib", "shakespeare"} and full["sets"]["shakespeare"]["group"] == "general"
    for p in res["proxies"]:
        m = json.loads((tmp_path / p["dir"] / "metrics.json").read_text())
        assert m["alpha"] == p["alpha"] and set(m["evals"]) == {"0", "1", "2"}
        assert f"data.alpha={p['alpha']:g}" in m["overrides"]
        assert not (tmp_path / p["dir"] / "run" / "checkpoints").exists()
    from cpt_megatron.eval.mixing_law import ExpLaw

    for s in full["sets"].values():  # the law in search.json is the fit of the measured proxies (rss consistent)
        resid = ExpLaw(**s["law"])(np.array(s["alphas"])) - np.array(s["loss"])
        assert float(resid @ resid) == pytest.approx(s["law"]["rss"], rel=1e-6, abs=1e-12)
        assert s["loss"] != [s["base_loss"]] * 3
    snippet = yaml.safe_load((out / "recommendation.yaml").read_text())
    assert res["alpha"] is None or snippet["data"]["alpha"] == pytest.approx(res["alpha"])
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {f: f.stat().st_mtime_ns for f in [*out.glob("proxies/*/metrics.json"), *out.glob("proxies/*/train.log")]}
    assert len(stamps) == 6
    rc, stdout, err = cli([*common, "--alphas", "1,0,0.5"], capsys)  # same proxies, any order: nothing reruns
    assert rc == 0, err
    again = json.loads(stdout.strip().splitlines()[-1])
    assert [p["reused"] for p in again["proxies"]] == [True] * 3 and again["alpha"] == res["alpha"]
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps   # no proxy retrained
    # a changed override (or base) is a different proxy, never a reused one; run.dir is not part of the key
    from cpt_megatron.train.mixture_search import SearchConfig, proxy_overrides

    def key(*ov):
        sc = SearchConfig(recipe="tiny_cpu", overrides=list(ov))
        return mixture_search._proxy_key(sc, proxy_overrides(sc, 0.5, 2))

    assert key() == key("run.dir=elsewhere") != key("optim.lr=5e-4")


def test_proxy_model_kinds(tmp_path):
    """--proxy-model picks the model key from what the path is, and clears the others (exactly one is allowed)."""
    from cpt_megatron.config import load_recipe
    from cpt_megatron.train.mixture_search import SearchConfig, proxy_overrides

    gguf, cfg_json, hf, ckpt = tmp_path / "m.gguf", tmp_path / "config.json", tmp_path / "hf", tmp_path / "ckpt"
    gguf.write_bytes(b"GGUF")
    cfg_json.write_text("{}")
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    ckpt.mkdir()
    for path, kind in ((gguf, "gguf"), (cfg_json, "hf_config"), (hf, "hf"), (ckpt, "base")):
        ov = mixture_search._model_overrides(str(path))
        assert f"model.{kind}={path.resolve()}" in ov and sum(not o.endswith("=null") for o in ov) == 1
    tiny = str(mixture_search.Path(__file__).resolve().parents[1] / "recipes" / "models" / "tiny_llama.json")
    sc = SearchConfig(recipe="tiny_cpu", proxy_model=tiny)
    model = load_recipe("tiny_cpu", proxy_overrides(sc, 0.5, 2)).model
    assert model.hf_config == tiny and model.gguf is None and model.base is None
