"""Combine the pieces scripts/gpu_check.sh wrote into ONE JSON (gpu_check.json) and a markdown table (gpu_check.md).

    python scripts/gpu_report.py WORK_DIR OUT_DIR

Reads WORK_DIR/{env.json, smoke_gpu.json, smoke_cpu.json, real.json, throughput.json}: a missing or failed step
fails the report, unless GPU_CHECK_SKIP names it (smoke, real, bench). Exit 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PARITY_TOL = 1e-5  # fp32 first loss, GPU vs CPU (issue #17)
GOAL_RATIO = 1.2  # ours >= 1.2 x best HF tokens/s


def _last_json(path: Path):
    """A whole-file JSON document, else the last line that is one (`--json` output after log lines)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def collect(work: Path) -> dict:
    rep: dict = {"env": _last_json(work / "env.json")}
    g, c = _last_json(work / "smoke_gpu.json"), _last_json(work / "smoke_cpu.json")
    if g and c:
        d0 = abs(g["losses"][0] - c["losses"][0])
        dmax = max(abs(a - b) for a, b in zip(g["losses"], c["losses"]))
        rep["parity"] = {"gpu": g["losses"], "cpu": c["losses"], "first_abs_diff": d0, "max_abs_diff": dmax,
                         "tol": PARITY_TOL, "ok": d0 <= PARITY_TOL}
    else:
        rep["parity"] = {"ok": False, "error": "smoke_gpu.json / smoke_cpu.json missing (see logs)"} if (g or c) else None
    rep["real_model"] = _last_json(work / "real.json")
    bench = _last_json(work / "throughput.json")
    rep["bench"] = bench
    if bench and bench.get("ratio_ours_over_best_hf") is not None:
        rep["bench_goal"] = {"ratio_ours_over_best_hf": bench["ratio_ours_over_best_hf"], "goal": GOAL_RATIO,
                             "met": bench["ratio_ours_over_best_hf"] >= GOAL_RATIO}
    skipped = {x for x in os.environ.get("GPU_CHECK_SKIP", "").split(",") if x}  # gpu_check.sh's knob
    steps = {"env": rep["env"] is not None,
             "parity": "skipped" if "smoke" in skipped else bool((rep["parity"] or {}).get("ok")),
             "real_model": "skipped" if "real" in skipped else bool((rep["real_model"] or {}).get("ok")),
             "bench": "skipped" if "bench" in skipped else bench is not None}
    rep["steps_ok"] = steps
    rep["ok"] = all(v is True or v == "skipped" for v in steps.values())
    return rep


def markdown(rep: dict) -> str:
    env = rep.get("env") or {}
    lines = [f"# GPU check: {env.get('device', '?')} (torch {env.get('torch')}, megatron-core {env.get('megatron_core')}, "
             f"TE {env.get('transformer_engine')}, spec {env.get('spec')})", ""]
    p = rep.get("parity")
    if p and "first_abs_diff" in p:
        lines += ["| check | value | result |", "| --- | --- | --- |",
                  f"| tiny fp32 first loss, GPU vs CPU | {p['first_abs_diff']:.2e} (tol {p['tol']:g}) | "
                  f"{'OK' if p['ok'] else 'MISMATCH'} |"]
    else:
        lines += ["| check | value | result |", "| --- | --- | --- |", "| tiny fp32 first loss, GPU vs CPU | - | not run |"]
    r = rep.get("real_model")
    if r:
        t = r["train"]
        lines += [f"| {r['source']}: import verify max abs logit diff | {r['import_verify']['max_abs_diff']:.2e} | "
                  f"spec {r['import_verify'].get('spec')} |",
                  f"| {len(t['losses'])} {'bf16' if 'dry' not in r['source'] else 'fp32'} steps: loss first -> after | "
                  f"{t['losses'][0]:.4f} -> {t['loss_after']:.4f} ({t['seconds']} s) | skipped {t['skipped']} |",
                  f"| export verify max abs logit diff | {(r.get('export_verify') or {}).get('max_abs_diff', float('nan')):.2e} | |",
                  f"| transformers reload loss vs ours | {r['reload_abs_diff']:.2e} | {'OK' if r['ok'] else 'FAILED'} |"]
    b = rep.get("bench")
    if b:
        s = b["shape"]
        lines += ["", f"Throughput: hidden {s['hidden']}, ffn {s['ffn']}, {s['layers']} layers, {s['heads']} heads "
                  f"({s['kv_heads']} KV), vocab {s['vocab']}, seq {s['seq_len']}, micro-batch {s['micro_batch']}, full "
                  f"AdamW step, {b['dtype']}", "",
                  "| variant | ms/step | tokens/s | TFLOP/s | MFU | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
        for v in b["results"]:
            lines.append(f"| {v['name']} | {v['step_s'] * 1e3:.1f} | {v['tokens_per_s']:.0f} | {v['tflops_per_s']:.1f} | "
                         f"{v['mfu'] * 100:.1f}% | {v['peak_mem_gib']:.1f} |")
        g = rep.get("bench_goal")
        if g:
            lines += ["", f"ours / best HF = {g['ratio_ours_over_best_hf']:.3f} (goal >= {g['goal']}: "
                      f"{'met' if g['met'] else 'NOT met'})"]
    lines += ["", f"steps: {rep['steps_ok']}  overall: {'OK' if rep['ok'] else 'FAILED'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    work, out = Path(argv[0]), Path(argv[1])
    rep = collect(work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
