"""Anti-forgetting regularizers: EWC (diagonal Fisher from replay batches at the base weights) and L2-SP.

Penalty: lam/2 * sum_i F_i (w_i - w0_i)^2, added as its gradient lam * F * (w - w0) to each parameter's
`main_grad` after the data-parallel reduction (Engine.train_step's grad_hook), so it costs no extra
forward/backward. Anchors and Fisher are kept per LOCAL shard, i.e. sharded exactly like the parameters:
memory = 2 x (local parameter bytes in fp32) per rank (anchor + Fisher; L2-SP stores no Fisher).
"""

from __future__ import annotations

import torch

__all__ = ["Regularizer"]


class Regularizer:
    def __init__(self, engine, kind: str, lam: float):
        self.kind, self.lam = kind, float(lam)
        self.params = [p for c in engine.chunks for p in c.parameters() if p.requires_grad]
        self.anchor = [p.detach().float().clone() for p in self.params]
        self.fisher: list[torch.Tensor] | None = None  # None = identity (L2-SP)

    @torch.no_grad()
    def estimate_fisher(self, engine, batches: list[list[dict]]) -> None:
        """Diagonal empirical Fisher: mean over replay batches of the squared (token-mean) gradient."""
        fisher = [torch.zeros_like(a) for a in self.anchor]
        for mbs in batches:
            for m in engine.model:
                m.zero_grad_buffer()
            engine.accumulate_grads(mbs)
            for f, p in zip(fisher, self.params):
                g = getattr(p, "main_grad", None)
                if g is None:
                    g = p.grad
                if g is not None:
                    f.add_(g.float() ** 2)
        n = max(1, len(batches))
        self.fisher = [f / n for f in fisher]
        mean = torch.stack([f.mean() for f in self.fisher]).mean().clamp(min=1e-30)
        self.fisher = [f / mean for f in self.fisher]  # normalized: lam has the same scale as in L2-SP
        for m in engine.model:
            m.zero_grad_buffer()

    def _weight(self, i: int):
        return 1.0 if self.fisher is None else self.fisher[i]

    @torch.no_grad()
    def penalty(self) -> float:
        """lam/2 * sum F (w - w0)^2 over this rank's shards (TP-replicated tensors counted on every rank)."""
        if not self.params:
            return 0.0
        terms = [(self._weight(i) * (p.detach().float() - a) ** 2).sum() for i, (p, a) in enumerate(zip(self.params, self.anchor))]
        return 0.5 * self.lam * float(torch.stack(terms).sum())  # one host sync, not one per parameter

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
