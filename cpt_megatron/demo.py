"""`cpt demo` / `make demo`: the whole CPT pipeline on real data, offline, each step one line of result.

prepare (import + verify, curate, preprocess: `cpt prepare`) -> tokenizer analyze (on the curated text) ->
mixture report -> train (eval at start/end) -> monitor events -> loss/eval plots (`cpt plot`) -> select (under
the run's own general-regression limit, eval.monitor.act) -> export-hf -> prune (keep the last and the exported
checkpoint) -> reload in transformers and complete a prompt -> summary. The run lands under OUT (default
runs/<recipe>: runs/demo, runs/demo_medical; a folder holding another recipe's demo is refused), the prepared data
in the recipe's data.cache_dir; OUT/summary.json holds the summary table. Each step reuses what earlier runs left,
so `--only STEP` reruns one step (preparation runs first: a hash check of everything once done; skipped for the
steps that read no prepared data, train/select/export/generate, when the manifest is there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cpt_megatron.config import load_recipe
from cpt_megatron.errors import CptError
from cpt_megatron.utils import write_json

__all__ = ["run_demo", "STEPS"]

STEPS = ("curate", "analyze", "preprocess", "mixture", "import", "train", "select", "export", "generate")
_ANALYZE_CHARS = 300_000
# steps that read no prepared data (`cpt train` checks the data itself before its first step, and not at all when
# the run is finished): run alone, they take the prepared manifest as it is instead of re-checking every file
_READS_NO_DATA = ("train", "select", "export", "generate")
PROMPTS = {"code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           # ends with a newline: after a bare "?" SmolLM2 (instruct) ends the text at once (EOS, an empty completion)
           "medical": "What are the symptoms of high blood pressure?\n"}


def _say(step: str, msg: str) -> None:
    print(f"[{step:>10}] {msg}", flush=True)


def default_out(recipe: str) -> str:
    """Each demo recipe its own folder: runs/demo, runs/demo_medical (a path recipe: its file's stem)."""
    return f"runs/{Path(recipe).stem}"


def run_demo(out: str | None = None, recipe: str = "demo", overrides: list[str] | None = None,
             only: str | None = None, device: str = "cpu") -> dict:
    if only and only not in STEPS:
        raise CptError(f"--only {only!r}: choose one of {', '.join(STEPS)}")
    t0 = time.time()
    out_dir = Path(out or default_out(recipe))
    ov = [f"run.dir={out_dir / 'run'}", *(overrides or []), *(["model.options.dtype=bf16"] if device == "cuda" else [])]
    cfg = load_recipe(recipe, ov)
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"artifacts": {}}
    _check_out(out_dir, recipe, cfg, summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["recipe"] = str(recipe)

    def want(step: str) -> bool:
        return only is None or only == step

    prepared = _prepare(cfg, want, summary, reads_data=only not in _READS_NO_DATA)
    if want("analyze"):
        _analyze(prepared, out_dir, summary)
    if want("mixture"):
        _mixture(cfg, prepared, out_dir)
    run_dir = Path(cfg.run.dir)
    if want("train"):
        _train(recipe, ov, run_dir, summary)
        _plots(run_dir, summary)
    if want("select") or want("export") or want("generate"):
        _select_export_generate(run_dir, out_dir, want, PROMPTS["medical" if "medical" in recipe else "code"], summary)
    _results_table(cfg, run_dir, summary)
    summary["seconds"] = round(time.time() - t0, 1)
    write_json(summary_path, summary)
    _print_table(summary, summary_path)
    return summary


def _check_out(out_dir: Path, recipe: str, cfg, summary: dict) -> None:
    """One line, before anything is written, when OUT holds another recipe's demo (its summary or its run)."""
    from cpt_megatron.train.checks import check_run_dir

    other = summary.get("recipe")
    if other is not None and Path(other).stem != Path(recipe).stem:
        raise CptError(f"{out_dir} holds the demo of recipe {other!r}, not {recipe!r}; give --out another folder "
                       f"(default for this recipe: {default_out(recipe)}) or delete {out_dir}")
    try:
        check_run_dir(cfg)
    except CptError as e:
        raise CptError(f"{out_dir}: {e}") from None


def _prepare(cfg, want, summary: dict, reads_data: bool = True) -> dict:
    """`cpt prepare` in process: base import (+ parity check), curation, tokenization, mixture index. For a step
    that reads no prepared data, an existing manifest is taken as it is (load_prepared: sizes, no checksums)."""
    from cpt_megatron.train.prepare import load_prepared, prepare

    t = time.time()
    prepared = None
    if not reads_data:
        try:
            prepared = load_prepared(cfg, "cpt prepare")
        except CptError:  # missing or stale: prepare it
            pass
    prepared = prepared or prepare(cfg)
    base = prepared["base"]
    if want("import"):
        meta = json.loads((Path(base) / "cpt_meta.json").read_text())
        imp = Path(base) / "import_summary.json"
        v = (json.loads(imp.read_text()).get("verify") if imp.exists() else None) or {}
        check = (f"verify max|logit diff| {v['max_abs_diff']:.2g}, top-1 {v.get('top1_agreement', 0):.3f}"
                 if "max_abs_diff" in v else "parity was checked when it was imported")
        _say("import", f"{meta.get('hf_config', {}).get('model_type', '?')} base -> {base} "
                       f"({time.time() - t:.0f}s; {check})")
    for s in prepared["sources"]:
        report = Path(s["prefix"]).parent / "curated" / "report.json"
        if want("curate") and report.is_file():
            rep = json.loads(report.read_text())
            _say("curate", f"{s['name']}: read {rep['read']}, kept {rep['kept']}, removed {rep['removed']}, "
                           f"malformed {rep['malformed']}")
        if want("preprocess"):
            m = json.loads(Path(s["prefix"] + ".meta.json").read_text())
            _say("preprocess", f"{s['name']}: {m.get('documents', '?')} docs, {m.get('tokens', 0):,} tokens -> "
                               f"{s['prefix']}.bin/.idx")
    summary["artifacts"]["base_checkpoint"] = base
    summary["artifacts"]["datasets"] = {s["name"]: s["prefix"] for s in prepared["sources"]}
    return prepared


def _analyze(prepared: dict, out_dir: Path, summary: dict) -> None:
    """Tokenizer fertility on each source's raw text."""
    from cpt_megatron.tokenizer.analyze import analyze

    files = []
    for s in prepared["sources"]:  # the curated text `cpt prepare` wrote (file and @ inputs alike)
        shards = sorted((Path(s["prefix"]).parent / "curated").glob("*.jsonl.gz"))
        if not shards:
            continue  # a `prefix:` source: tokens only, no text to analyze
        txt = out_dir / "analyze" / f"{s['name']}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        chars = 0
        with open(txt, "w") as f:
            for doc in _curated_texts(shards):
                f.write(doc + "\n")
                chars += len(doc) + 1
                if chars >= _ANALYZE_CHARS:
                    break
        files.append(str(txt))
    if not files:
        _say("analyze", "no source has curated text (prefix sources only): nothing to analyze")
        return
    rep = analyze([prepared["tokenizer"]], files, max_chars=_ANALYZE_CHARS, out_dir=out_dir / "analyze")
    cells = [f"{r['source'].removesuffix('.txt')} fertility {r['fertility']:.2f} tokens/word, "
             f"{r['chars_per_token']:.2f} chars/token, {r['split4_word_share']:.1%} words split >= 4"
             for r in rep.get("per_source", [])]
    _say("analyze", "; ".join(cells) or f"report in {out_dir / 'analyze'}")
    summary["artifacts"]["tokenizer_report"] = str(out_dir / "analyze" / "report.md")


def _curated_texts(shards: list[Path]):
    import gzip

    for shard in shards:
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def _mixture(cfg, prepared: dict, out_dir: Path) -> None:
    from cpt_megatron.train.plan import recipe_mixture

    mix = recipe_mixture(cfg, prepared, valid_samples=8)
    rep = mix.report()
    shares = ", ".join(f"{k} {v['share']:.2f} ({v['epochs']:.2f} epochs)" for k, v in rep["sources"].items())
    _say("mixture", f"alpha {cfg.data.alpha}: {shares}; {rep['tokens']:,} training tokens")
    mix.plot(str(out_dir / "mixture.png"))


def _train(recipe: str, ov: list[str], run_dir: Path, summary: dict) -> None:
    """`cpt train` in a child process (its own process group), then the monitor's events."""
    t = time.time()
    cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", recipe, *ov, "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}
    from cpt_megatron.runtime.procs import popen_kwargs

    proc = subprocess.run(cmd, text=True, capture_output=True, env=env, **popen_kwargs(new_session=False))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise CptError(f"training failed (exit {proc.returncode}); see above")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = res["losses"]
    _say("train", f"steps {res['first_step']}..{res['last_step']}, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                  f"({time.time() - t:.0f}s) -> {run_dir}" if losses else f"already trained -> {run_dir}")
    events = run_dir / "events.jsonl"
    evs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
    kinds = {k: sum(e["kind"] == k for e in evs) for k in ("baseline", "ok", "warn", "act")}
    _say("monitor", f"{len(evs)} events: {kinds}")
    summary["train_seconds"] = round(time.time() - t, 1)


def _select_export_generate(run_dir: Path, out_dir: Path, want, prompt: str, summary: dict) -> None:
    best = _select(run_dir, say=want("select"))
    export_dir = out_dir / "export"
    if want("export"):
        from cpt_megatron.checkpoint.hf_export import export_hf

        export_hf(run_dir / "checkpoints" / best, export_dir, overwrite=True)
        _say("export", f"{best} -> {export_dir} (HF safetensors, tokenizer, model card)")
        _prune(run_dir, best)
    summary["artifacts"].update(run=str(run_dir), best=best, export=str(export_dir))
    if want("generate"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cpt_megatron.utils import hf_quiet

        with hf_quiet():
            tk = AutoTokenizer.from_pretrained(export_dir)
            model = AutoModelForCausalLM.from_pretrained(export_dir)
        ids = tk(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=40, do_sample=False)
        text = tk.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)
        _say("generate", "transformers loaded the export; completion:\n" + prompt + text if text.strip() else
             f"transformers loaded the export; it ended the text right after the prompt {prompt!r} (EOS)")
        summary["completion"] = prompt + text


def _select(run_dir: Path, say: bool = True) -> str:
    """`cpt select` under the run's own general-regression limit (its monitor's act threshold); when no checkpoint
    keeps within it, the one that regresses least is exported and the line says so."""
    from cpt_megatron.eval.plot import run_thresholds
    from cpt_megatron.eval.select import select_checkpoint

    limit = run_thresholds(run_dir)[1]
    sel = select_checkpoint(run_dir, max_general_regression=limit)
    best = sel.get("best")
    if best is not None:
        if say:
            _say("select", f"best {best} (step {sel['step']}; general regression within {limit:+.1%}) -> "
                           f"{run_dir / 'selection.md'}, selection.png")
        return best
    least = min(sel["candidates"], key=lambda c: (c["general_regression"], -c["domain_gain"]))
    if say:
        _say("select", f"no checkpoint keeps the general regression within {limit:+.1%} (eval.monitor.act); "
                       f"exporting the least regressed, {least['iter']} ({least['general_regression']:+.1%} general, "
                       f"{least['domain_gain']:+.1%} domain)")
    return least["iter"]


def _prune(run_dir: Path, exported: str) -> None:
    """The demo keeps the last checkpoint (to resume) and the exported one; the others go (~1 GB each here)."""
    import shutil

    from cpt_megatron.checkpoint import layout

    dirs = layout.iteration_folders(run_dir / "checkpoints")
    keep = {dirs[-1].name, exported} if dirs else set()
    sizes = {p.name: _du(p) for p in dirs}
    for p in dirs:
        if p.name not in keep:
            shutil.rmtree(p)
    kept = sorted(keep)
    _say("prune", f"kept {' + '.join(kept)} (the last, to resume, and the exported one; "
                  f"{sum(sizes[k] for k in kept) / 1e9:.2f} GB); removed {len(dirs) - len(kept)} other checkpoint(s), "
                  f"{sum(v for k, v in sizes.items() if k not in keep) / 1e9:.2f} GB")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _plots(run_dir: Path, summary: dict) -> None:
    """The PNGs `cpt plot` writes: loss + lr, per-source eval change vs base (with the monitor's thresholds)."""
    from cpt_megatron.eval.plot import plot_run

    res = plot_run(run_dir)
    names = ", ".join(Path(p).name for p in res["plots"])
    _say("plots", f"{names} -> {run_dir / 'plots'}")
    summary["artifacts"]["plots"] = [str(p) for p in res["plots"]]


def _results_table(cfg, run_dir: Path, summary: dict) -> None:
    """Perplexity before/after per source, from the run's first and last evaluation."""
    evals_path = run_dir / "evals.jsonl"
    if not evals_path.exists():
        return
    evals = [json.loads(x) for x in evals_path.read_text().splitlines()]
    first, last = evals[0], evals[-1]
    summary["table"] = {name: {"group": r["group"], "ppl_before": round(r["ppl"], 3),
                               "ppl_after": round(last["results"][name]["ppl"], 3),
                               "change": round(last["results"][name]["ppl"] / r["ppl"] - 1, 4)}
                        for name, r in first["results"].items()}
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    summary["tokens_trained"] = len(metrics) * cfg.train.global_batch * cfg.data.seq_len


def _print_table(summary: dict, summary_path: Path) -> None:
    if "table" not in summary:
        return
    print("\n| source | group | ppl before | ppl after | change |\n|---|---|---|---|---|")
    for name, r in summary["table"].items():
        print(f"| {name} | {r['group']} | {r['ppl_before']} | {r['ppl_after']} | {r['change']:+.1%} |")
    print(f"\ntokens trained {summary.get('tokens_trained', 0):,}; total {summary['seconds']:.0f}s; "
          f"artifacts: {json.dumps(summary['artifacts'])}; summary: {summary_path}")
