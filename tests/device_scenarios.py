"""Device-correctness scenarios for tests/test_device.py, run in a subprocess (they need megatron-core on CPU,
i.e. the CPU redirects, which never enter the pytest process): `python tests/device_scenarios.py OUT_DIR`.

Prints one JSON line: {scenario: {"ok": bool, "error": str|None, ...facts}}. Each scenario runs its code path
under tests/device_guard.DeviceGuard (mixed devices / factory without device= / host syncs from our code).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]

from device_guard import DeviceGuard  # noqa: E402

TINY = REPO / "recipes" / "models" / "tiny_llama.json"
SEQ, MB = 16, 2


def _batches(vocab: int, n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n * MB, SEQ + 1), generator=g)
    return [{"tokens": x[i:i + MB, :-1].contiguous(), "labels": x[i:i + MB, 1:].contiguous()}
            for i in range(0, n * MB, MB)]


def verify_meta(arch, parallel):
    """verify's megatron forward with the model on the fake device `meta`, fed CPU tokens (as verify is)."""
    from cpt_megatron.checkpoint.verify import megatron_logits
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime.device import device_override

    with device_override("meta"):
        chunks = build_model(arch, parallel, ModelOptions(dtype="fp32", initialize=False))
        tokens = torch.randint(0, arch.vocab_size, (2, SEQ))
        with DeviceGuard():
            logits = megatron_logits(chunks, tokens, arch.vocab_size, parallel)
    return {"device": str(logits.device), "shape": list(logits.shape)}


def reporter_rank(arch, parallel):
    from cpt_megatron.checkpoint.verify import _reporter_rank

    with DeviceGuard():
        return {"rank": _reporter_rank()}


def _engine(arch, parallel):
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.train.engine import Engine, OptimConfig

    chunks = build_model(arch, parallel, ModelOptions(dtype="fp32"))
    return Engine(chunks, parallel, OptimConfig(lr=1e-3), seq_len=SEQ, micro_batch=MB)


def train_step(arch, parallel):
    """A full step (forward, backward, DP reduce, optimizer) adds no host sync of ours; reading the loss adds one."""
    engine = _engine(arch, parallel)
    guard = DeviceGuard()
    with guard:
        res = engine.train_step(_batches(arch.vocab_size))
        in_step = list(guard.syncs)
        loss = res.loss
        _ = res.tokens
    return {"syncs_in_step": in_step, "syncs_total": len(guard.syncs), "loss": loss, "skipped": res.skipped}


def eval_step(arch, parallel):
    engine = _engine(arch, parallel)
    guard = DeviceGuard()
    with guard:
        loss, tokens = engine.eval_step(_batches(arch.vocab_size))
    return {"syncs": len(guard.syncs), "loss": loss, "tokens": tokens}


def ewc(arch, parallel):
    from cpt_megatron.train.ewc import Regularizer

    engine = _engine(arch, parallel)
    guard = DeviceGuard()
    with guard:
        reg = Regularizer(engine, "ewc", 1.0)
        reg.estimate_fisher(engine, _batches(arch.vocab_size, n=1))
        fisher_syncs = len(guard.syncs)
        engine.train_step(_batches(arch.vocab_size), grad_hook=reg)
        step_syncs = len(guard.syncs) - fisher_syncs
        pen = reg.penalty()
    return {"fisher_syncs": fisher_syncs, "step_syncs": step_syncs,
            "penalty_syncs": len(guard.syncs) - fisher_syncs - step_syncs, "penalty": pen}


def import_verify_export(arch, parallel, out: Path):
    """`cpt import-hf` (conversion + verify_checkpoint) and `cpt export-hf` of a tiny random Llama, guarded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_megatron.checkpoint.hf_export import export_hf
    from cpt_megatron.checkpoint.hf_import import import_hf
    from cpt_megatron.runtime import destroy_distributed

    destroy_distributed()  # verify makes its own 1-rank group
    hf = out / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(TINY))).save_pretrained(hf)
    with DeviceGuard():
        res = import_hf(str(hf), out / "ckpt", dtype="fp32")
        export_hf(out / "ckpt", out / "export")
    return {"max_abs_diff": res["verify"]["max_abs_diff"], "spec": res["verify"].get("spec"),
            "exported": sorted(p.name for p in (out / "export").iterdir())}


def main(out: Path, names: list[str]) -> dict:
    from cpt_megatron.model import load_hf_config
    from cpt_megatron.runtime import ParallelConfig, init_distributed

    arch, parallel = load_hf_config(str(TINY)), ParallelConfig()
    report = {}
    for name in names:
        init_distributed(parallel, seed=1234)
        try:
            fn = globals()[name]
            facts = fn(arch, parallel, out) if name == "import_verify_export" else fn(arch, parallel)
            report[name] = {"ok": True, "error": None, **facts}
        except Exception as e:  # reported to the test, which asserts on it
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    return report


if __name__ == "__main__":
    out = Path(sys.argv[1])
    names = sys.argv[2:] or ["verify_meta", "reporter_rank", "train_step", "eval_step", "ewc", "import_verify_export"]
    print(json.dumps(main(out, names)))
