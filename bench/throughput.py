"""Training throughput, side by side in ONE process on one GPU: our Engine path vs HF transformers.

Variants (--variants, run in order, each on a fresh model; memory freed between them):
  ours                 build_model + Engine exactly as `cpt train` builds them (megatron DDP, megatron AdamW with
                       bf16 params + fp32 master weights and fp32 grad reduction; distributed optimizer off at 1 GPU;
                       kernel options "auto" = model/kernels.py's fastest available). `ours:KEY=VAL+KEY=VAL` overrides
                       ModelOptions kernel fields, e.g. `ours:compile=off+fused_ce=off`.
  hf_eager             LlamaForCausalLM(attn_implementation="sdpa"), fp32 weights + torch.autocast(bf16) (the HF
                       Trainer bf16 recipe: fp32 master weights like ours), torch.optim.AdamW(fused=True), eager.
  hf_compile           the same with torch.compile of the forward+loss function.
The loss is the token-mean CE over all s positions for both (HF's own loss also upcasts logits to fp32).
FLOPs: cpt_megatron.flops.train_flops_per_token (the formula the trainer logs); MFU against flops.GPUS.

Host syncs in our measured step: megatron's grad-norm `.item()` (the non-finite check is folded into it,
Engine._optimizer_step) and reading StepResult.loss (the device-side [loss_sum, tokens] copied once). HF variants
sync once per step (loss.item()) so both are timed the same way; the window is closed with torch.cuda.synchronize().

    python bench/throughput.py                      # the issue's 1.5B Llama shape, seq 2048, micro-batch 4
    python bench/throughput.py --tiny --steps 2     # CPU smoke (fp32, tiny shape); --dry-run is the same
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt_megatron import flops  # noqa: E402

# The 1.5B Llama shape (#11).
LLAMA_1P5B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)


def _hf_config_dict(args) -> dict:
    if args.hf_config:
        p = Path(args.hf_config)
        return json.loads((p / "config.json" if p.is_dir() else p).read_text())
    base = TINY if args.tiny else LLAMA_1P5B
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **base}


def _gpu_name(override: str | None) -> str:
    if override:
        return override
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for key, gpu in (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("a100", "a100"),
                     ("b200", "b200"), ("l40s", "l40s")):
        if key in name:
            return gpu
    return "cpu"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_mem():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mem_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS high-water mark on CPU


def _batches(n: int, micro: int, seq: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro, seq + 1), generator=g) for _ in range(n)]


def _timed(step_fn, batches, warmup: int) -> tuple[list[float], float]:
    """Run warmup + measured steps; returns (all losses, seconds per measured step)."""
    losses = []
    for b in batches[:warmup]:
        losses.append(step_fn(b))
    _sync()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        losses.append(step_fn(b))
    _sync()
    return losses, (time.perf_counter() - t0) / max(1, len(batches) - warmup)


# ---------------------------------------------------------------------------------------------------------
def run_ours(arch, overrides: dict, batches, args, dtype: str):
    from megatron.core import parallel_state as ps

    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig
    from cpt_megatron.train.engine import Engine, OptimConfig
    from cpt_megatron.train.smoke import init_random_weights

    parallel = ParallelConfig()  # 1 GPU: no TP/PP, distributed optimizer off (as `cpt train` at 1 GPU)
    chunks = build_model(arch, parallel, ModelOptions(dtype=dtype, **overrides))
    init_random_weights(chunks, args.seed, ps.get_tensor_model_parallel_rank(), 1)
    plan = chunks[0].kernel_plan
    hf_state = _ours_to_hf_state(arch, chunks[0]) if args.same_init else None
    engine = Engine(chunks, parallel, OptimConfig(lr=args.lr, min_lr=args.lr, weight_decay=0.1),
                    seq_len=args.seq_len, micro_batch=args.micro_batch)

    def step(b):
        mb = {"tokens": b[:, :-1].contiguous(), "labels": b[:, 1:].contiguous()}
        return engine.train_step([mb]).loss  # reading .loss is the step's one sync of ours

    losses, dt = _timed(step, batches, args.warmup)
    kernels = {k: v for k, v in plan.to_dict().items() if k != "reasons"}
    return losses, dt, kernels, hf_state


def _ours_to_hf_state(arch, chunk) -> dict:
    """TP=1 local-spec state_dict -> HF Llama names (CPU fp32 copies), so HF starts from our weights."""
    from cpt_megatron.checkpoint.mapping import unpack_qkv

    sd = {k: v.detach().float().cpu() for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    V = arch.vocab_size
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:V],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    out["lm_head.weight"] = (sd["output_layer.weight"] if "output_layer.weight" in sd
                             else sd["embedding.word_embeddings.weight"])[:V]
    for i in range(arch.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = unpack_qkv(arch, sd[m + "self_attention.linear_qkv.weight"])
        gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({h + "input_layernorm.weight": sd[m + "input_layernorm.weight"],
                    h + "post_attention_layernorm.weight": sd[m + "pre_mlp_layernorm.weight"],
                    h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": sd[m + "self_attention.linear_proj.weight"],
                    h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                    h + "mlp.down_proj.weight": sd[m + "mlp.linear_fc2.weight"]})
    return out


def run_hf(cfg: dict, compiled: bool, batches, args, hf_state: dict | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = dev == "cuda" and not args.fp32
    torch.manual_seed(args.seed)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32).to(dev)
    if hf_state is not None:
        missing, unexpected = model.load_state_dict(hf_state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"HF weight copy: missing {missing}, unexpected {unexpected}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=dev == "cuda")

    def loss_fn(ids, labels):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))

    fn = torch.compile(loss_fn) if compiled else loss_fn

    def step(b):
        b = b.to(dev, non_blocking=True)
        loss = fn(b[:, :-1], b[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # one sync per step, as ours

    losses, dt = _timed(step, batches, args.warmup)
    return losses, dt, {"attn_implementation": "sdpa", "autocast_bf16": bf16, "adamw_fused": dev == "cuda",
                        "torch_compile": compiled}


# ---------------------------------------------------------------------------------------------------------
def _parse_variant(v: str) -> tuple[str, dict]:
    name, _, rest = v.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split("+") if kv) if rest else {}
    return name, overrides


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-config", help="HF config.json (or dir) instead of the issue's 1.5B Llama shape")
    ap.add_argument("--tiny", "--dry-run", action="store_true", help="tiny shape, fp32, seq 32, micro-batch 2 (CPU smoke)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compile happens here)")
    ap.add_argument("--variants", default="ours,hf_eager,hf_compile")
    ap.add_argument("--fp32", action="store_true", help="fp32 everywhere (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--same-init", action="store_true", help="HF starts from our weights (default with --tiny)")
    ap.add_argument("--gpu", default=None, help="GPU type for MFU (default: from the device name)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default="throughput.json", help="where to write the results")
    args = ap.parse_args(argv)
    if args.tiny:
        args.seq_len = args.seq_len or 32
        args.micro_batch = args.micro_batch or 2
        args.same_init = True
    args.seq_len = args.seq_len or 2048
    args.micro_batch = args.micro_batch or 4
    cuda = torch.cuda.is_available()
    dtype = "fp32" if (args.fp32 or args.tiny or not cuda) else "bf16"
    if args.tiny and cuda:
        dtype = "fp32"

    from cpt_megatron.model import load_hf_config
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed

    cfg = _hf_config_dict(args)
    with tempfile.TemporaryDirectory() as td:
        (Path(td) / "config.json").write_text(json.dumps(cfg))
        arch = load_hf_config(Path(td) / "config.json")
    arch.check_seq_len(args.seq_len)
    fpt = flops.train_flops_per_token(arch, args.seq_len)
    gpu = _gpu_name(args.gpu)
    tokens_per_step = args.micro_batch * args.seq_len
    batches = _batches(args.warmup + args.steps, args.micro_batch, args.seq_len, arch.vocab_size, args.seed)

    if "MASTER_PORT" not in os.environ:  # a free port: other jobs may share this machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init_distributed(ParallelConfig(), seed=args.seed)
    results, hf_state = [], None
    try:
        for v in [x for x in args.variants.split(",") if x]:
            name, overrides = _parse_variant(v)
            _reset_mem()
            if name == "ours":
                losses, dt, kernels, st = run_ours(arch, overrides, batches, args, dtype)
                hf_state = hf_state or st
            elif name in ("hf_eager", "hf_compile"):
                losses, dt, kernels = run_hf(cfg, name == "hf_compile", batches, args, hf_state)
            else:
                raise SystemExit(f"unknown variant {name!r}: ours[:K=V+K=V] | hf_eager | hf_compile")
            tps = tokens_per_step / dt
            r = {"name": v, "step_s": dt, "tokens_per_s": tps, "tflops_per_s": tps * fpt / 1e12,
                 "mfu": flops.mfu(tps, fpt, gpu, 1), "peak_mem_gib": _peak_mem_gib(), "losses": losses,
                 "kernels": kernels}
            results.append(r)
            print(f"{v:28s} {dt * 1e3:9.1f} ms/step {tps:11.0f} tok/s {r['tflops_per_s']:7.1f} TFLOP/s "
                  f"MFU {r['mfu'] * 100:5.1f}%  peak {r['peak_mem_gib']:6.1f} GiB  loss0 {losses[0]:.4f}",
                  flush=True)
            _reset_mem()
    finally:
        destroy_distributed()

    ours = [r for r in results if r["name"].startswith("ours")]
    hf = [r for r in results if r["name"].startswith("hf")]
    out = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpu_type": gpu, "torch": torch.__version__,
        "dtype": dtype if not (cuda and dtype == "bf16") else "bf16 (ours: bf16 params + fp32 master; HF: autocast)",
        "shape": {"hidden": arch.hidden_size, "ffn": arch.ffn_hidden_size, "layers": arch.num_layers,
                  "heads": arch.num_heads, "kv_heads": arch.num_kv_heads, "vocab": arch.vocab_size,
                  "tied": arch.tie_word_embeddings, "seq_len": args.seq_len, "micro_batch": args.micro_batch},
        "flops_per_token": fpt, "tokens_per_step": tokens_per_step, "warmup": args.warmup, "steps": args.steps,
        "results": results,
    }
    if ours and hf:
        best_hf = max(hf, key=lambda r: r["tokens_per_s"])
        best_ours = max(ours, key=lambda r: r["tokens_per_s"])
        out["ratio_ours_over_best_hf"] = best_ours["tokens_per_s"] / best_hf["tokens_per_s"]
        out["best_hf"], out["best_ours"] = best_hf["name"], best_ours["name"]
        print(f"ours ({best_ours['name']}) / best HF ({best_hf['name']}): {out['ratio_ours_over_best_hf']:.3f}x")
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
