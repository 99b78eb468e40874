"""Issue 19 items 10-12: the mixture schema is documented by a complete example that loads, every shipped
recipe has a standalone mixture file equal to its data section, help texts describe every flag, README
statements hold, and the plots are readable (integer steps, cumulative share, legend off the bars)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from cpt_megatron.data.mixture import MixtureConfig, PhaseConfig, SourceConfig, mixture_config_from_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def _doc_example() -> dict:
    text = (REPO / "docs" / "mixtures.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/mixtures.md holds exactly one yaml example"
    return yaml.safe_load(blocks[0])


def test_docs_example_is_complete_and_loads():
    raw = _doc_example()
    cfg = mixture_config_from_dict(raw)
    assert cfg.alpha == 0.7 and [p.alpha for p in cfg.phases] == [0.5, None, 0.6]
    assert [s.group for s in cfg.sources] == ["domain", "domain", "general", "general"]
    assert cfg.sources[2].tokens == 20_000_000 and cfg.sources[3].weight == 1.0
    # complete: every field of the three dataclasses appears in the example
    assert {f.name for f in dataclasses.fields(MixtureConfig)} <= set(raw)
    assert {f.name for f in dataclasses.fields(SourceConfig)} <= set().union(*raw["sources"])
    assert {f.name for f in dataclasses.fields(PhaseConfig)} <= set().union(*raw["phases"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_mixture_file_matches_recipe(recipe):
    from cpt_megatron.config import load_recipe

    path = REPO / "recipes" / "mixtures" / f"{recipe}.yaml"
    assert path.is_file(), f"recipes/mixtures/{recipe}.yaml missing: one mixture example per shipped recipe"
    mix = mixture_config_from_dict(yaml.safe_load(path.read_text()))
    data = load_recipe(recipe, []).data
    assert mix.alpha == data.alpha and mix.valid_fraction == data.valid_fraction and mix.seed == data.seed
    assert [(p.until, p.alpha) for p in mix.phases] == [(p.get("until"), p.get("alpha")) for p in data.phases]
    assert [(s.name, s.group, s.weight, s.tokens) for s in mix.sources] == \
        [(s.name, s.group, s.weight, s.tokens) for s in data.sources]
    for s, d in zip(mix.sources, data.sources):
        if d.prefix:
            assert s.prefix == d.prefix
    assert f"--mixture recipes/mixtures/{recipe}.yaml" in path.read_text()


def _sub(parser: argparse.ArgumentParser, *names) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_help_describes_every_flag():
    from cpt_megatron.cli import build_parser

    root = build_parser()
    bare = []

    def walk(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not a.help:
                bare.append(f"{name} {'/'.join(a.option_strings) or a.dest}")

    walk(root, "cpt")
    assert not bare, f"flags without --help text: {bare}"
    tol = next(a for a in _sub(root, "import-hf")._actions if "--verify-tol" in a.option_strings).help
    assert "1e-4" in tol and "hidden x layers <= 4096" in tol and "tiny, 1e-3" not in tol
    curate = " ".join(_sub(root, "curate").format_help().split())
    assert "ONE document unless --doc-separator" in curate
    pre = " ".join(_sub(root, "preprocess").format_help().split())
    assert "JSONL only" in pre and "cpt curate" in pre


def test_readme_statements():
    readme = (REPO / "README.md").read_text()
    assert "not wired yet" not in readme
    assert "make demo DOMAIN=medical" in readme and (REPO / "recipes" / "demo_medical.yaml").is_file()
    assert "DOMAIN" in (REPO / "Makefile").read_text()
    assert "./runs/cache/" in readme and "`make demo-curate|" in readme and "demo-curate" in (REPO / "Makefile").read_text()
    from cpt_megatron.config import load_recipe

    assert load_recipe("demo", []).data.cache_dir == "runs/cache"


# ---------------------------------------------------------------------------------------------------
# item 12: plots


@pytest.fixture
def saved_axes(monkeypatch):
    """Record each figure's axes at savefig time (ticks after a draw), without reading PNG pixels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    seen = []
    orig = Figure.savefig

    def spy(self, *a, **kw):
        self.canvas.draw()
        seen.append(self)
        return orig(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def test_plot_steps_are_integers(tmp_path, saved_axes, capsys):
    from cpt_megatron.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 - 0.1 * s, "lr": 1e-4}) + "\n"
                                               for s in (1, 2, 3)))
    (run / "evals.jsonl").write_text("".join(json.dumps({"step": s, "results": {
        "med": {"group": "domain", "ppl": 10 - s}, "wiki": {"group": "general", "ppl": 20 + 0.1 * s}}}) + "\n"
        for s in (0, 2, 3)))
    assert main(["plot", "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [Path(p).name for p in out["plots"]] == ["loss.png", "evals.png"]
    for fig in saved_axes:
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_mixture_plot_is_cumulative_share(tmp_path, saved_axes):
    from cpt_megatron.data.mixture import Mixture

    di = np.array([0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1])  # source 0 = domain
    fake = SimpleNamespace(train=SimpleNamespace(dataset_index=di), phase_boundaries=[0, 6, 12],
                           phase_alphas=[0.6, 0.5], cfg=SimpleNamespace(sources=[
                               SimpleNamespace(group="domain"), SimpleNamespace(group="general")]))
    Mixture.plot(fake, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 0
    ax = saved_axes[0].axes[0]
    realized = [ln for ln in ax.get_lines() if ln.get_label().startswith("realized")]
    assert len(realized) == 1
    ys = np.concatenate([ln.get_ydata() for ln in ax.get_lines() if ln.get_color() == realized[0].get_color()])
    d = (di == 0).astype(float)
    want = np.concatenate([np.cumsum(d[:6]) / np.arange(1, 7), np.cumsum(d[6:]) / np.arange(1, 7)])
    np.testing.assert_allclose(ys, want)
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_fertility_legend_covers_no_bar_and_names_columns(tmp_path, gpt2_tokenizer_dir, saved_axes, capsys):
    import shutil

    from cpt_megatron.cli import main

    for d in ("base", "ext"):
        shutil.copytree(gpt2_tokenizer_dir, tmp_path / d / "tokenizer")
    text = tmp_path / "notes.txt"
    text.write_text("The patient was given acetaminophen for hypertension.\n" * 20)
    argv = ["tokenizer", "analyze", "-t", str(tmp_path / "base" / "tokenizer"), "-t", str(tmp_path / "ext" / "tokenizer"),
            "-t", f"gpt2={tmp_path / 'base' / 'tokenizer'}", "-i", str(text), "-o", str(tmp_path / "rep"), "--json"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["tokenizers"] == ["base/tokenizer", "ext/tokenizer", "gpt2"]
    fig = saved_axes[-1]
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches]
    assert len(bars) == 3 and not any(legend.overlaps(b) for b in bars)
