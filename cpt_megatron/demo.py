"""`cpt demo` / `make demo`: the whole CPT pipeline on real data, offline, each step one line of result.

curate -> tokenizer analyze -> preprocess -> mixture report -> import + verify -> train (eval at start/end)
-> monitor events -> select -> export-hf -> reload in transformers and complete a code prompt -> summary.
Everything lands under OUT (default runs/demo); OUT/summary.json holds the summary table. Each step reuses
what earlier runs left, so `--only STEP` reruns one step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cpt_megatron.config import load_recipe
from cpt_megatron.errors import CptError
from cpt_megatron.utils import write_json

__all__ = ["run_demo", "STEPS"]

STEPS = ("curate", "analyze", "preprocess", "mixture", "import", "train", "select", "export", "generate")
PROMPTS = {"code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "medical": "What are the symptoms of high blood pressure?"}


def _say(step: str, msg: str) -> None:
    print(f"[{step:>10}] {msg}", flush=True)


def run_demo(out: str = "runs/demo", recipe: str = "demo", overrides: list[str] | None = None,
             only: str | None = None, device: str = "cpu") -> dict:
    prompt = PROMPTS["medical" if "medical" in recipe else "code"]
    if only and only not in STEPS:
        raise CptError(f"--only {only!r}: choose one of {', '.join(STEPS)}")
    t0 = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ov = [f"run.dir={out_dir / 'run'}", *(overrides or [])]
    if device == "cuda":
        ov += ["model.options.dtype=bf16"]
    cfg = load_recipe(recipe, ov)
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"artifacts": {}}

    def want(step: str) -> bool:
        return only is None or only == step

    from cpt_megatron.train.prepare import prepare_base, prepare_sources

    # import + verify first: the base model's tokenizer drives curation lengths and tokenization
    if True:  # always: later steps need the base checkpoint (cached after the first run)
        t = time.time()
        base = prepare_base(cfg.model, cfg.data.cache_dir, cfg.run.seed)
        meta = json.loads((Path(base) / "cpt_meta.json").read_text())
        imp = Path(base) / "import_summary.json"
        if want("import"):
            v = (json.loads(imp.read_text()).get("verify") if imp.exists() else None) or {}
            check = (f"verify max|logit diff| {v['max_abs_diff']:.2g}, top-1 {v.get('top1_agreement', 0):.3f}"
                     if "max_abs_diff" in v else "parity was checked when it was imported")
            _say("import", f"{meta.get('hf_config', {}).get('model_type', '?')} base -> {base} "
                           f"({time.time() - t:.0f}s; {check})")
        summary["artifacts"]["base_checkpoint"] = base
    tok = str(Path(base) / "tokenizer")

    t = time.time()
    sources = prepare_sources(cfg.data, tok)
    for s in sources:
        root = Path(s["prefix"]).parent
        if want("curate"):
            rep = json.loads((root / "curated" / "report.json").read_text())
            _say("curate", f"{s['name']}: read {rep['read']}, kept {rep['kept']}, removed {rep['removed']}, "
                           f"malformed {rep['malformed']}")
        if want("preprocess"):
            m = json.loads(Path(s["prefix"] + ".meta.json").read_text())
            _say("preprocess", f"{s['name']}: {m.get('documents', '?')} docs, {m.get('tokens', 0):,} tokens -> "
                               f"{s['prefix']}.bin/.idx")
    summary["artifacts"]["datasets"] = {s["name"]: s["prefix"] for s in sources}

    if want("analyze"):
        from cpt_megatron.tokenizer.analyze import analyze

        files = []
        for s in sources:
            raw = sorted((Path(s["prefix"]).parent / "raw").glob("*.jsonl"))
            txt = out_dir / "analyze" / f"{s['name']}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            with open(txt, "w") as f:
                for line in open(raw[0]):
                    f.write(json.loads(line)["text"] + "\n")
            files.append(str(txt))
        rep = analyze([tok], files, max_chars=300_000, out_dir=out_dir / "analyze")
        cells = [f"{r['source'].removesuffix('.txt')} fertility {r['fertility']:.2f} tokens/word, "
                 f"{r['chars_per_token']:.2f} chars/token, {r['split4_word_share']:.1%} words split >= 4"
                 for r in rep.get("per_source", [])]
        _say("analyze", "; ".join(cells) or f"report in {out_dir / 'analyze'}")
        summary["artifacts"]["tokenizer_report"] = str(out_dir / "analyze" / "report.md")

    if want("mixture"):
        from cpt_megatron.train.prepare import recipe_mixture

        mix = recipe_mixture(cfg)
        rep = mix.report()
        shares = ", ".join(f"{k} {v['share']:.2f} ({v['epochs']:.2f} epochs)" for k, v in rep["sources"].items())
        _say("mixture", f"alpha {cfg.data.alpha}: {shares}; {rep['tokens']:,} training tokens")
        mix.plot(str(out_dir / "mixture.png"))

    run_dir = Path(cfg.run.dir)
    if want("train"):
        t = time.time()
        cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", recipe, *ov, "--json"]
        import os

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

    if want("select") or want("export") or want("generate"):
        from cpt_megatron.eval.select import select_checkpoint

        sel = select_checkpoint(run_dir, max_general_regression=1.0)
        best = sel.get("best")
        if want("select"):
            _say("select", f"best {best} (step {sel.get('step')}) -> {run_dir / 'selection.md'}")
        export_dir = out_dir / "export"
        if want("export"):
            from cpt_megatron.checkpoint.hf_export import export_hf

            export_hf(run_dir / "checkpoints" / best, export_dir, overwrite=True)
            _say("export", f"{best} -> {export_dir} (HF safetensors, tokenizer, model card)")
        summary["artifacts"].update(run=str(run_dir), best=best, export=str(export_dir))
        if want("generate"):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tk = AutoTokenizer.from_pretrained(export_dir)
            model = AutoModelForCausalLM.from_pretrained(export_dir)
            ids = tk(prompt, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=40, do_sample=False)
            text = tk.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)
            _say("generate", "transformers loaded the export; completion:\n" + prompt + text)
            summary["completion"] = prompt + text

    evals_path = run_dir / "evals.jsonl"
    if evals_path.exists():
        evals = [json.loads(x) for x in evals_path.read_text().splitlines()]
        first, last = evals[0], evals[-1]
        table = {}
        for name, r in first["results"].items():
            table[name] = {"group": r["group"], "ppl_before": round(r["ppl"], 3),
                           "ppl_after": round(last["results"][name]["ppl"], 3),
                           "change": round(last["results"][name]["ppl"] / r["ppl"] - 1, 4)}
        summary["table"] = table
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary["tokens_trained"] = len(metrics) * cfg.train.global_batch * cfg.data.seq_len
    summary["seconds"] = round(time.time() - t0, 1)
    write_json(summary_path, summary)
    if "table" in summary:
        print("\n| source | group | ppl before | ppl after | change |\n|---|---|---|---|---|")
        for name, r in summary["table"].items():
            print(f"| {name} | {r['group']} | {r['ppl_before']} | {r['ppl_after']} | {r['change']:+.1%} |")
        print(f"\ntokens trained {summary.get('tokens_trained', 0):,}; total {summary['seconds']:.0f}s; "
              f"artifacts: {json.dumps(summary['artifacts'])}; summary: {summary_path}")
    return summary
