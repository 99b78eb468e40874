"""Conversion peak memory vs model size: synthetic Llama written to disk, then import-hf and export-hf.

    python bench/convert_bench.py --size 1b --work /tmp/convert_bench [--json]

Builds a random HF checkpoint (safetensors shards written tensor by tensor, never a whole model in RAM),
then runs `cpt import-hf --no-verify` and `cpt export-hf --no-verify` as child processes and samples the
RSS of each child and its descendants (dist_checkpointing writer processes included) every 50 ms.
Reports the peak RSS of the largest process and the peak anonymous RSS summed over the process tree (RSS
also counts reclaimable page cache of memory-mapped files) against the
model size and the largest single tensor. The bound claimed: peak anon RSS - baseline <~ 2 x largest tensor + fixed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = {  # hidden, ffn, layers, heads, kv heads, vocab
    "tiny": (256, 688, 4, 8, 4, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B shape
}


def write_synthetic(out: Path, size: str, max_shard_bytes: int = 1 << 30) -> dict:
    import torch
    from safetensors.torch import save_file

    H, F, L, nh, ng, V = SIZES[size]
    d = H // nh
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": H,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": ng,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "self_attn.q_proj.weight": (nh * d, H),
                       p + "self_attn.k_proj.weight": (ng * d, H), p + "self_attn.v_proj.weight": (ng * d, H),
                       p + "self_attn.o_proj.weight": (H, nh * d), p + "post_attention_layernorm.weight": (H,),
                       p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F)})
    shapes.update({"model.norm.weight": (H,), "lm_head.weight": (V, H)})
    shards, cur, cur_b = [], [], 0
    for n, s in shapes.items():
        b = 4 * int(torch.Size(s).numel())
        if cur and cur_b + b > max_shard_bytes:
            shards.append(cur)
            cur, cur_b = [], 0
        cur.append(n)
        cur_b += b
    shards.append(cur)
    wm, g = {}, torch.Generator().manual_seed(0)
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.randn(shapes[n], generator=g) * 0.02 for n in names}, str(out / fname))
        wm.update({n: fname for n in names})
    total = sum(4 * int(torch.Size(s).numel()) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    largest = max(4 * int(torch.Size(s).numel()) for s in shapes.values())
    # the largest tensor the converter materializes: fc1 = [gate; up] (2F x H), or the embedding
    largest_converted = max(largest, 4 * 2 * F * H)
    return {"params": total // 4, "bytes": total, "largest_tensor_bytes": largest,
            "largest_converted_bytes": largest_converted}


def _anon_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _pss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree_rss(pid: int) -> tuple[int, int, int]:
    """(largest RSS of one process, anonymous RSS summed over the tree, proportional anonymous (Pss_Anon) sum).

    RSS also counts clean page-cache pages of memory-mapped files (the staged tensors, the safetensors
    shards), which the kernel drops under pressure; anonymous RSS is the memory conversion really needs.
    """
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0, 0
    rss = anon = pss = 0
    for p in procs:
        try:
            rss = max(rss, p.memory_info().rss)
            anon += _anon_mib(p.pid)
            pss += _pss_anon(p.pid)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            pass
    return rss, anon, pss


def run_measured(cmd: list[str]) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "anon": 0, "pss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            r, a, p = _tree_rss(proc.pid)
            peak["rss"], peak["anon"], peak["pss"] = max(peak["rss"], r), max(peak["anon"], a), max(peak["pss"], p)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_bytes": peak["rss"], "peak_anon_bytes": peak["anon"],
            "peak_pss_anon_bytes": peak["pss"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--work", default="/tmp/convert_bench")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    info = write_synthetic(work / "hf", args.size)
    cpt = [sys.executable, "-m", "cpt_megatron"]
    baseline = run_measured([sys.executable, "-c", "import cpt_megatron.checkpoint.hf_import, megatron.core, "
                             "transformers, torch.distributed.checkpoint"])
    imp = run_measured(cpt + ["import-hf", "--hf", str(work / "hf"), "--out", str(work / "mc"), "--no-verify"])
    man = run_measured([sys.executable, "-c", "import sys; from cpt_megatron.checkpoint import layout; "
                        "layout.write_manifest(layout.resolve(sys.argv[1]))", str(work / "mc")])
    exp = run_measured(cpt + ["export-hf", "--ckpt", str(work / "mc"), "--out", str(work / "ex"), "--no-verify",
                              "--max-shard-size", "1GB"])
    gib = 2**30
    res = {"size": args.size, **info, "import_baseline": baseline, "import": imp, "export": exp, "manifest": man}
    lc = info["largest_converted_bytes"]
    for k in ("import_baseline", "import", "export", "manifest"):
        r = res[k]
        print(f"{k:16s} {r['seconds']:7.1f}s  peak RSS (largest process) {r['peak_rss_bytes'] / gib:6.2f} GiB  "
              f"peak anon (all processes) {r['peak_anon_bytes'] / gib:6.2f} GiB", flush=True)
    print(f"model {info['bytes'] / gib:.2f} GiB fp32, {info['params'] / 1e9:.2f}B params; largest converted tensor "
          f"{lc / gib:.3f} GiB; import anon - baseline = {(imp['peak_anon_bytes'] - baseline['peak_anon_bytes']) / lc:.2f}"
          f" x largest; export = {(exp['peak_anon_bytes'] - baseline['peak_anon_bytes']) / lc:.2f} x largest")
    print(f"anonymous memory counted proportionally (Pss_Anon: copy-on-write pages shared with forked writers "
          f"counted once): import - baseline = {(imp['peak_pss_anon_bytes'] - baseline['peak_pss_anon_bytes']) / lc:.2f}"
          f" x largest; export = {(exp['peak_pss_anon_bytes'] - baseline['peak_pss_anon_bytes']) / lc:.2f} x largest")
    print(f"checkpoint manifest (sizes + checksums of every file, what each save adds): {man['seconds']:.1f}s incl. "
          f"~{baseline['seconds']:.1f}s of interpreter start-up, vs {imp['seconds']:.1f}s for the import")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
