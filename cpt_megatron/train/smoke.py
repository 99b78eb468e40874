"""`cpt smoke`: random-weight model from an HF config, N Adam steps on fixed synthetic tokens.

Weights come from a layout-independent init (seeded per global parameter name), and every layout sees
the same global batch, so TP/PP/DP/SP/distributed-optimizer runs start from the same loss.
"""

from __future__ import annotations

import torch

from cpt_megatron.errors import CptError
from cpt_megatron.model import ModelOptions, build_model, global_init_tensor, global_shape, load_hf_config
from cpt_megatron.model.sharding import load_global_tensors, local_param_specs
from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed
from cpt_megatron.train.batches import rank_microbatches
from cpt_megatron.train.engine import Engine, OptimConfig

__all__ = ["run_smoke", "init_random_weights", "synthetic_batch", "update_norms"]


def init_random_weights(chunks, seed: int, tp_rank: int, tp_size: int, std: float = 0.02) -> None:
    shapes = {}
    for c in chunks:
        for name, p in c.named_parameters():
            spec = local_param_specs(c)[name]
            shapes[spec.global_name] = global_shape(spec.kind, p.shape, tp_size)
    load_global_tensors(chunks, lambda g: global_init_tensor(g, shapes[g], seed, std), tp_rank, tp_size)


def synthetic_batch(global_batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g)


def split_for_rank(samples: torch.Tensor, dp_rank: int, dp: int, micro_batch: int) -> list[dict]:
    """Rows of (seq_len + 1) token ids -> this DP rank's {tokens, labels} micro-batches."""
    rows = [{"tokens": r[:-1], "labels": r[1:]} for r in samples]
    return rank_microbatches(rows, 0, len(rows), dp_rank, dp, micro_batch)[0]


def update_norms(chunks, start: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """||w - w_start|| per global parameter name, assembled from every rank's TP shards (collective).

    Layout-independent: TP shards add up (sum of squares), replicated tensors count once, DP replicas and the
    last stage's tied copy of the embedding are the same tensor and count once.
    """
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    mine = {}
    if ps.get_data_parallel_rank() == 0:
        for c, c_start in zip(chunks, start):
            specs = local_param_specs(c)
            for name, p in c.named_parameters():
                spec = specs[name]
                if spec.kind == "replicated" and tp_rank:
                    continue
                key = (spec.global_name, tp_rank if spec.kind != "replicated" else 0)
                d = p.detach().double() - c_start[name]
                mine.setdefault(key, float(d.pow(2).sum()))
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    merged = {}
    for part in parts:
        merged.update(part)
    sums: dict[str, float] = {}
    for (gname, _), sq in merged.items():
        sums[gname] = sums.get(gname, 0.0) + sq
    return {k: v ** 0.5 for k, v in sorted(sums.items())}


def tp_replica_diff(chunks) -> float:
    """Largest |difference| between TP ranks' copies of TP-replicated tensors (norms): 0 when they agree."""
    from megatron.core import parallel_state as ps

    group, worst = ps.get_tensor_model_parallel_group(), 0.0
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0.0
    for c in chunks:
        specs = local_param_specs(c)
        for name, p in c.named_parameters():
            if specs[name].kind == "replicated":
                lo, hi = p.detach().clone(), p.detach().clone()
                torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
                torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
                worst = max(worst, float((hi - lo).abs().max()))
    return worst


def run_smoke(hf_config: str, *, steps: int, parallel: ParallelConfig, seq_len: int = 32, global_batch: int = 8,
              micro_batch: int = 2, seed: int = 1234, lr: float = 1e-3, dtype: str = "auto",
              regularizer: str = "none", lam: float = 0.0, fisher_batches: int = 2) -> dict:
    """`regularizer` ewc | l2sp (train.ewc): anchored at the initial weights, EWC's Fisher from `fisher_batches`
    micro-batches of a second synthetic batch; the global penalty after each step is reported."""
    from megatron.core import parallel_state as ps

    arch = load_hf_config(hf_config)
    denv = init_distributed(parallel, seed=seed)
    try:
        dp = parallel.dp(denv.world_size)
        if global_batch % (micro_batch * dp):
            raise CptError(f"global batch {global_batch} must be divisible by micro_batch*dp = {micro_batch}*{dp}")
        chunks = build_model(arch, parallel, ModelOptions(dtype=dtype))
        init_random_weights(chunks, seed, ps.get_tensor_model_parallel_rank(), parallel.tp)
        engine = Engine(chunks, parallel, OptimConfig(lr=lr, min_lr=lr, weight_decay=0.0), seq_len=seq_len,
                        micro_batch=micro_batch)
        fixed = synthetic_batch(global_batch, seq_len, arch.vocab_size, seed)
        start = [{n: p.detach().double().clone() for n, p in c.named_parameters()} for c in chunks]
        reg, penalties, extra = None, [], {}
        if regularizer != "none":
            from cpt_megatron.train.ewc import Regularizer

            reg = Regularizer(engine, regularizer, lam, vocab_size=arch.vocab_size)
            if regularizer == "ewc":  # the same replay micro-batches on every rank
                replay = synthetic_batch(fisher_batches * micro_batch, seq_len, arch.vocab_size, seed + 1)
                reg.estimate_fisher(engine, split_for_rank(replay, 0, 1, micro_batch))
                extra["fisher_normaliser"] = float(reg.normaliser)
        losses, grad_norms, first_update = [], [], None
        for step in range(steps):
            samples = fixed
            mbs = split_for_rank(samples, ps.get_data_parallel_rank(), dp, micro_batch)
            res = engine.train_step(mbs, grad_hook=reg)
            losses.append(res.loss)
            grad_norms.append(res.grad_norm)
            if reg is not None:
                penalties.append(reg.penalty())
            if step == 0:
                first_update = update_norms(chunks, start)
            if denv.rank == 0:
                print(f"step {step + 1}/{steps} loss {res.loss:.6f} grad_norm {res.grad_norm or 0:.4f}", flush=True)
        # grad norms (before clipping) and per-tensor update norms: Adam + clipping would hide a uniform
        # gradient scale (a DP or token-normalization bug) from the losses, not from these
        if reg is not None:
            extra.update(penalties=penalties, tp_replica_diff=tp_replica_diff(chunks))
        return {"losses": losses, "grad_norms": grad_norms, "update_norms_step1": first_update,
                "update_norms": update_norms(chunks, start), "tp": parallel.tp, "pp": parallel.pp, "dp": dp,
                "rank": denv.rank, **extra}
    finally:
        destroy_distributed()
