"""Anti-forgetting regularizers: EWC (diagonal Fisher on replay data at the base weights) and L2-SP.

Penalty: lam/2 * sum_i F_i (w_i - w0_i)^2 over the WHOLE model, F normalised to mean 1 (so lam has the
same scale as in L2-SP, where F = 1). Its gradient lam * F * (w - w0) is added to each parameter's
`main_grad` after the gradient reduction (Engine.train_step's grad_hook), so it costs no extra
forward/backward.

Correct in every layout (TP, SP, PP, VPP, CP, DP, distributed optimizer):
- anchors and Fisher are kept per LOCAL shard, sharded exactly like the parameters;
- the penalty and the Fisher normaliser are sums over unique elements, all-reduced over the model-parallel
  group (TP x PP): a TP-replicated tensor (norms) is counted on TP rank 0 only, the last pipeline stage's copy
  of tied embeddings not at all (megatron's `param_is_not_tensor_parallel_duplicate` / `shared`); DP and CP
  replicas hold the same values and are not summed. The logged penalty is therefore the global one, and every
  TP rank adds the same gradient to its copy of a replicated tensor (the copies stay equal).

Fisher: the mean over replay micro-batches m of g_m^2, g_m = the token-mean gradient of micro-batch m
(the empirical Fisher with micro-batches as the samples). Not the square of one big batch's mean gradient:
that is ~1/M of it and mostly the squared mean, not the curvature EWC weights by. Per-micro-batch (not
per-sequence) because a micro-batch is the unit megatron's schedules differentiate; it is layout-independent
because every DP rank runs the same micro-batches (the reduction over DP is then a mean of equal gradients,
an all-reduce even with the distributed optimizer, whose reduce-scatter would leave other shards partial).
The micro-batches are the first `train.ewc.batches` of the general (replay) source's validation tail.

Memory per rank: EWC 8 bytes per local parameter (fp32 anchor + fp32 Fisher), L2-SP 4 (anchor only);
the Fisher estimate costs `batches` forward+backward passes once, at start-up.
"""

from __future__ import annotations

import torch

__all__ = ["Regularizer"]


def _counts_once(p) -> bool:
    """True on exactly one rank of the model-parallel group for each unique model element."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    return param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)


def _model_rows(chunks, vocab_size: int | None) -> list[int | None]:
    """Per trainable parameter: how many leading rows are model elements (the vocab tensors' local shard minus
    megatron's padding rows, whose count depends on TP), None = all."""
    from megatron.core import parallel_state as ps

    from cpt_megatron.model.sharding import local_param_specs

    rank, out = ps.get_tensor_model_parallel_rank(), []
    for c in chunks:
        specs = local_param_specs(c)
        for name, p in c.named_parameters():
            if not p.requires_grad:
                continue
            if vocab_size is None or specs[name].kind != "vocab":
                out.append(None)
            else:
                out.append(max(0, min(p.shape[0], vocab_size - rank * p.shape[0])))
    return out


class Regularizer:
    def __init__(self, engine, kind: str, lam: float, vocab_size: int | None = None):
        """`vocab_size`: the tokenizer's (unpadded) vocabulary; padding rows are then left out of the penalty
        and the Fisher normaliser (without it, the padding, which grows with TP, counts)."""
        self.kind, self.lam = kind, float(lam)
        self.params = [p for c in engine.chunks for p in c.parameters() if p.requires_grad]
        self.unique = [_counts_once(p) for p in self.params]
        self.rows = _model_rows(engine.chunks, vocab_size)
        self.anchor = [p.detach().float().clone() for p in self.params]
        self.fisher: list[torch.Tensor] | None = None  # None = identity (L2-SP)
        self.normaliser: torch.Tensor | None = None  # mean raw Fisher over the whole model (EWC)
        self._mp_group = engine.model_parallel_group()

    def _mp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if torch.distributed.get_world_size(self._mp_group) > 1:
            torch.distributed.all_reduce(t, group=self._mp_group)
        return t

    @torch.no_grad()
    def estimate_fisher(self, engine, microbatches: list[dict]) -> None:
        """Diagonal empirical Fisher: mean over `microbatches` of each one's squared token-mean gradient.
        Every rank passes the same micro-batches (see the module docstring)."""
        fisher = [torch.zeros_like(a) for a in self.anchor]
        for mb in microbatches:
            for m in engine.model:
                m.zero_grad_buffer()
            # interleaved pipelines need >= pp micro-batches: fully masked copies add no loss, tokens or gradient
            pad = engine.min_microbatches() - 1
            masked = [{**mb, "loss_mask": torch.zeros_like(mb["labels"], dtype=torch.float)}] * pad if pad else []
            engine.accumulate_grads([mb] + masked, full_grads=True)
            for f, p in zip(fisher, self.params):
                g = getattr(p, "main_grad", None)
                if g is None:
                    g = p.grad
                if g is not None:
                    f.add_(g.float() ** 2)
        for f in fisher:
            f.div_(max(1, len(microbatches)))
        dev = fisher[0].device if fisher else torch.device("cpu")
        # global mean over unique elements (sum and count all-reduced over TP x PP): one normaliser everywhere
        tot = torch.zeros(2, dtype=torch.float64, device=dev)
        for f, once, rows in zip(fisher, self.unique, self.rows):
            if once:
                f = f if rows is None else f[:rows]
                tot[0] += f.sum(dtype=torch.float64)
                tot[1] += f.numel()
        self._mp_sum(tot)
        self.normaliser = (tot[0] / tot[1].clamp(min=1)).clamp(min=1e-30)
        self.fisher = [(f / self.normaliser).float() for f in fisher]  # lam on the same scale as in L2-SP
        for m in engine.model:
            m.zero_grad_buffer()

    def _weight(self, i: int):
        return 1.0 if self.fisher is None else self.fisher[i]

    @torch.no_grad()
    def penalty_tensor(self) -> torch.Tensor:
        """lam/2 * sum F (w - w0)^2 over the whole model (each unique element once), on the device, equal on
        every rank (collective over the model-parallel group)."""
        dev = self.anchor[0].device if self.anchor else torch.device("cpu")
        tot = torch.zeros(1, dtype=torch.float64, device=dev)
        for i, (p, a, once, rows) in enumerate(zip(self.params, self.anchor, self.unique, self.rows)):
            if once:
                term = self._weight(i) * (p.detach().float() - a) ** 2
                tot += (term if rows is None else term[:rows]).sum(dtype=torch.float64)
        return self._mp_sum(tot).mul_(0.5 * self.lam)

    def penalty(self) -> float:
        """The global penalty as a float (collective; one host sync)."""
        return float(self.penalty_tensor())

    @torch.no_grad()
    def add_grad(self, engine) -> None:
        for i, (p, a) in enumerate(zip(self.params, self.anchor)):
            g = self.lam * self._weight(i) * (p.detach().float() - a)
            if getattr(p, "main_grad", None) is not None:
                p.main_grad.add_(g.to(p.main_grad.dtype))
            elif p.grad is not None:
                p.grad.add_(g.to(p.grad.dtype))

    def __call__(self, engine) -> None:
        self.add_grad(engine)

    # ---- run state: what the anchors and Fisher were computed with (they are recomputed at start-up) ------
    def state_dict(self) -> dict:
        return {"kind": self.kind, "lam": self.lam,
                "fisher_normaliser": None if self.normaliser is None else float(self.normaliser)}

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state)

    def changes(self) -> str | None:
        """One line when the Fisher recomputed at start-up differs from the checkpoint's (None = same). A changed
        train.ewc.kind/lam (also none <-> ewc) is named by the recipe fingerprint (train/state.py)."""
        saved = getattr(self, "saved", None)
        if not saved:
            return None
        a, b = saved.get("fisher_normaliser"), self.state_dict()["fisher_normaliser"]
        if a is not None and b is not None and abs(a - b) > 1e-6 * max(abs(a), abs(b)):
            return (f"resume: the Fisher differs from the checkpoint's (normaliser {a:.6g} -> {b:.6g}): other replay "
                    "data or base")
        return None

