"""One training step on megatron-core: DDP-wrapped chunks, megatron optimizer, pipeline schedules.

`Engine` is shared by `cpt smoke`, `cpt train` and the throughput bench, so all of them run exactly
the same model + optimizer path. Loss is the exact token mean over the global batch in every layout
(`calculate_per_token_loss`: per-microbatch loss sums, gradients scaled by the global token count).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from cpt_megatron.config import OptimConfig

__all__ = ["OptimConfig", "Engine", "StepResult"]


@dataclasses.dataclass
class StepResult:
    loss: float  # token-mean over the global batch
    tokens: int  # loss tokens in the global batch
    grad_norm: float | None
    skipped: bool  # update skipped (non-finite gradients)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    """megatron-core forward_step_func: batch dict -> (per-token loss or hidden states, loss_func)."""
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    else:
        position_ids = position_ids.to(dev, non_blocking=True)
    loss_mask = batch.get("loss_mask")
    loss_mask = torch.ones_like(labels, dtype=torch.float) if loss_mask is None else loss_mask.to(dev)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, loss_mask)


class Engine:
    """Wraps model chunks in megatron DDP, builds the megatron optimizer, and runs train/eval steps."""

    def __init__(self, chunks, parallel, optim: OptimConfig, *, seq_len: int, micro_batch: int):
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.parallel = parallel
        self.seq_len, self.micro_batch = seq_len, micro_batch
        config = chunks[0].config
        self.config = config
        cuda = torch.cuda.is_available()
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=bool(parallel.overlap_grad_reduce and cuda),
            use_distributed_optimizer=parallel.distributed_optimizer,
            check_for_nan_in_grad=False,
            bucket_size=None if not cuda else 40_000_000,
        )
        self.model = [
            DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0))
            for i, c in enumerate(chunks)
        ]
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            adam_eps=optim.eps,
            clip_grad=optim.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=parallel.distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, self.model)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        if ddp_cfg.overlap_grad_reduce:
            no_sync = [m.no_sync for m in self.model]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self._ps = parallel_state

    # ---------------------------------------------------------------------------------------------
    def _run(self, microbatches: list[dict], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        iters = [iter(microbatches) for _ in self.model]
        fwd_bwd = get_forward_backward_func()
        out = fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=self.seq_len,
            micro_batch_size=self.micro_batch,
            forward_only=forward_only,
        )
        return self._reduce_loss(out)

    def _reduce_loss(self, out) -> tuple[float, int]:
        """Global (sum, count) over microbatches, the last PP stage and DP; identical on every rank."""
        ps = self._ps
        t = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for d in out:
                t += d["lm loss"].detach().to("cpu", torch.float64)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        t = t.to(dev)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        t = t.cpu()
        return float(t[0] / t[1].clamp(min=1)), int(t[1])

    def train_step(self, microbatches: list[dict], grad_hook=None) -> StepResult:
        """One optimizer step. `grad_hook(engine)` runs after gradients are final (DP-reduced, token-averaged)
        and before the update: regularizers add their gradient to `param.main_grad` there (EWC / L2-SP)."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, tokens = self._run(microbatches, forward_only=False)
        if grad_hook is not None:
            grad_hook(self)
        if not self._grads_finite():
            # bf16/fp32 optimizers have no loss scaler to catch this: skip the update, keep the weights
            self.optimizer.zero_grad()
            for m in self.model:
                m.zero_grad_buffer()
            return StepResult(loss, tokens, float("nan"), skipped=True)
        ok, grad_norm, _ = self.optimizer.step()
        return StepResult(loss, tokens, None if grad_norm is None else float(grad_norm), skipped=not ok)

    def _grads_finite(self) -> bool:
        """Collective: True when every rank's gradients are finite (one fused reduction per rank, one all-reduce)."""
        sums = [g.float().sum() for m in self.model for p in m.parameters()
                if (g := getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad) is not None]
        bad = torch.zeros(1, device=sums[0].device if sums else "cpu")
        if sums:
            bad = (~torch.isfinite(torch.stack(sums).sum())).float().reshape(1)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return not bool(bad.item())

    def accumulate_grads(self, microbatches: list[dict]) -> tuple[float, int]:
        """Forward + backward only: gradients land in `param.main_grad` (DP-reduced, token-averaged), no update.
        The caller zeroes the grad buffers (regularizers estimating a Fisher use it)."""
        for m in self.model:
            m.train()
        with torch.enable_grad():
            return self._run(microbatches, forward_only=False)

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict]) -> tuple[float, int]:
        for m in self.model:
            m.eval()
        return self._run(microbatches, forward_only=True)

    @property
    def chunks(self):
        """The bare GPTModel chunks (inside the DDP wrappers)."""
        return [m.module for m in self.model]

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            # megatron's scheduler reads max_lr/min_lr from param groups; keep them in sync on resume (#1138)
            g.pop("max_lr", None)
            g.pop("min_lr", None)
