"""One training step on megatron-core: DDP-wrapped chunks, megatron optimizer, pipeline schedules.

`Engine` is shared by `cpt smoke`, `cpt train` and the throughput bench, so all of them run exactly
the same model + optimizer path. Loss is the exact token mean over the global batch in every layout
(`calculate_per_token_loss`: per-microbatch loss sums, gradients scaled by the global token count).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from cpt_megatron.config import OptimConfig
from cpt_megatron.runtime.device import current_device, on_gpu

__all__ = ["OptimConfig", "Engine", "StepResult", "ddp_bucket_size", "is_torch_adam", "init_adam_state"]


class StepResult:
    """One step's outcome. The loss stays on the device until `loss`/`tokens` is read (the host sync happens
    then, e.g. once per log interval); `grad_norm` is megatron's (already on the host), `skipped` = non-finite."""

    def __init__(self, stats: torch.Tensor, grad_norm: float | None, skipped: bool):
        self._stats, self._host = stats, None  # stats: float64 [loss_sum, tokens] on the device
        self.grad_norm, self.skipped = grad_norm, skipped

    def _sync(self) -> tuple[float, int]:
        if self._host is None:
            s, n = self._stats.tolist()
            self._host = (s / max(n, 1.0), int(n))
        return self._host

    @property
    def loss(self) -> float:
        """Token-mean loss over the global batch (host sync on first read)."""
        return self._sync()[0]

    @property
    def tokens(self) -> int:
        """Loss tokens in the global batch."""
        return self._sync()[1]


def ddp_bucket_size(local_params: int, dp: int) -> int:
    """Gradient-reduce bucket (elements) from the model size: Megatron-LM's max(40M, 1M x dp), raised to 1/16 of
    this rank's parameters for big shards (fewer, larger collectives; still >= 16 buckets to overlap)."""
    return max(40_000_000, 1_000_000 * dp, local_params // 16)


def is_torch_adam(inner) -> bool:
    """torch Adam/AdamW (megatron's fallback without TE/apex) keep a per-param `step` tensor; TE/apex FusedAdam
    keep it in the param group."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


@torch.no_grad()
def init_adam_state(o) -> None:
    """Give every parameter of megatron optimizer `o` (one of `chained_optimizers`) its zero Adam state, as
    megatron's `init_state_fn` does, plus torch Adam's per-param `step` (0). megatron-core 0.16.1's
    DistributedOptimizer.state_dict() requires that step on every param when TE/apex is missing (`assert
    len(steps) == 1`), so a fresh optimizer cannot build the sharded state dict a checkpoint is loaded into."""
    inner = o.optimizer
    o.init_state_fn(inner, o.config)
    if is_torch_adam(inner):
        for g in inner.param_groups:
            for p in g["params"]:
                inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def _set_states_keep_step(o, orig, model_param, tensors: dict) -> None:
    """Engine.load_optimizer_state's stand-in for DistributedOptimizer._set_main_param_and_optimizer_states."""
    if "step" not in tensors:
        group_index, group_order = o.model_param_group_index_map[model_param]
        state = o.optimizer.state[o.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in state:
            tensors = {**tensors, "step": state["step"]}
    orig(model_param, tensors)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    """megatron-core forward_step_func: batch dict -> (per-token loss or hidden states, loss_func)."""
    batch = next(data_iterator)
    dev = current_device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    else:
        position_ids = position_ids.to(dev, non_blocking=True)
    loss_mask = batch.get("loss_mask")
    loss_mask = torch.ones_like(labels, dtype=torch.float) if loss_mask is None else loss_mask.to(dev)
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() > 1:  # this CP rank's (load-balanced) sequence chunks
        from megatron.core.utils import get_batch_on_this_cp_rank

        b = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                                       "position_ids": position_ids})
        tokens, labels, loss_mask, position_ids = b["tokens"], b["labels"], b["loss_mask"], b["position_ids"]
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
        cuda = on_gpu()
        local_params = sum(p.numel() for c in chunks for p in c.parameters())
        self.overlap_param_gather = parallel.param_gather_overlap(cuda)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=bool(parallel.overlap_grad_reduce and cuda),
            overlap_param_gather=self.overlap_param_gather,
            use_distributed_optimizer=parallel.distributed_optimizer,
            check_for_nan_in_grad=False,
            bucket_size=ddp_bucket_size(local_params, parallel_state.get_data_parallel_world_size()) if cuda else None,
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
        if self.overlap_param_gather:  # the next forward's pre-hooks wait for each bucket's all-gather
            param_sync = [m.start_param_sync for m in self.model]
            config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
        self._ps = parallel_state
        self.freezer = None  # train/stages.Freezer: train.stages' frozen parameters/rows (set by the driver)

    def _torch_adam_dist_optimizers(self) -> list:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        return [o for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                if isinstance(o, DistributedOptimizer) and is_torch_adam(o.optimizer)]

    def prepare_optimizer_load(self) -> None:
        """Before the sharded state dict a checkpoint is loaded into is built: the distributed optimizer's
        torch-Adam state must exist (init_adam_state; megatron does this itself for the non-distributed
        optimizer). The values are overwritten by the load."""
        for o in self._torch_adam_dist_optimizers():
            if not o.optimizer.state:
                init_adam_state(o)

    def load_optimizer_state(self, state_dict: dict) -> None:
        """megatron's optimizer.load_state_dict, made to work with the distributed optimizer on torch Adam (no
        TE/apex) in megatron-core 0.16.1, which has two defects there:
        - load_parameter_state_from_fully_reshardable leaves torch Adam's "step" out of the tensors it hands to
          _set_main_param_and_optimizer_states, which copies every key of the param's state: KeyError 'step'.
          The step is restored from the checkpoint's param groups just before (load_state_dict), so the
          param's own step is passed through unchanged;
        - load_state_dict gives every param the SAME step tensor, which torch's foreach Adam then increments
          once per param per step (wrong bias correction): each param gets its own copy afterwards."""
        patched = []
        for o in self._torch_adam_dist_optimizers():
            orig = getattr(o, "_set_main_param_and_optimizer_states", None)
            if orig is None or not hasattr(o, "model_param_group_index_map"):
                raise RuntimeError("megatron-core's DistributedOptimizer changed (no _set_main_param_and_optimizer_"
                                   "states/model_param_group_index_map): revisit Engine.load_optimizer_state")
            o._set_main_param_and_optimizer_states = partial(_set_states_keep_step, o, orig)
            patched.append(o)
        try:
            self.optimizer.load_state_dict(state_dict)
        finally:
            for o in patched:
                del o._set_main_param_and_optimizer_states  # the class's method again
        for o in patched:
            for st in o.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()

    def sync_params(self) -> None:
        """Finish the distributed optimizer's overlapped parameter all-gather (before eval, save, export)."""
        if self.overlap_param_gather:
            for m in self.model:
                m.start_param_sync(force_sync=True)

    # ---------------------------------------------------------------------------------------------
    def _run(self, microbatches: list[dict], forward_only: bool, force_all_reduce: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        iters = [iter(microbatches) for _ in self.model]
        fwd_bwd = get_forward_backward_func()
        out = fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=self.seq_len // self.parallel.cp,  # per CP rank
            micro_batch_size=self.micro_batch,
            forward_only=forward_only,
            force_all_reduce=force_all_reduce,
        )
        return self._reduce_loss(out)

    def _reduce_loss(self, out) -> torch.Tensor:
        """Global float64 [loss_sum, tokens] over microbatches, the last PP stage and DP x CP, on the device and
        identical on every rank (no host sync: the caller reads it when it needs the number)."""
        ps = self._ps
        t = torch.zeros(2, dtype=torch.float64, device=current_device())
        if ps.is_pipeline_last_stage(ignore_virtual=True) and out:
            t += torch.stack([d["lm loss"].detach() for d in out]).to(torch.float64).sum(0)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
        if torch.distributed.get_world_size(dp_cp) > 1:
            torch.distributed.all_reduce(t, group=dp_cp)
        return t

    def train_step(self, microbatches: list[dict], grad_hook=None) -> StepResult:
        """One optimizer step. `grad_hook(engine)` runs after gradients are final (DP-reduced, token-averaged)
        and before the update: regularizers add their gradient to `param.main_grad` there (EWC / L2-SP)."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self._run(microbatches, forward_only=False)
        if grad_hook is not None:
            grad_hook(self)
        if self.freezer is not None:
            self.freezer.mask_grads()  # after any regularizer: frozen elements get no gradient at all
        ok, grad_norm = self._optimizer_step()
        if not ok:
            # bf16/fp32 optimizers have no loss scaler to catch this: skip the update, keep the weights
            self.optimizer.zero_grad()
            for m in self.model:
                m.zero_grad_buffer()
        return StepResult(stats, grad_norm, skipped=not ok)

    def _optimizer_step(self) -> tuple[bool, float | None]:
        """megatron's optimizer step with the non-finite check folded into its grad norm: the norm (one all-reduce,
        megatron's one host sync per step) is inf/nan exactly when some gradient is; then nothing is updated."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        if opt.prepare_grads():  # fp16 loss scaler found inf (bf16/fp32: never)
            return False, None
        grad_norm = opt.get_grad_norm()
        if grad_norm is not None and not math.isfinite(grad_norm):
            return False, float(grad_norm)
        for o in getattr(opt, "chained_optimizers", [opt]):
            params = [] if getattr(o, "is_stub_optimizer", False) else o.get_parameters()
            if params and o.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(params, max_norm=o.config.clip_grad, total_norm=grad_norm,
                                             use_decoupled_grad=o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        if self.freezer is None:
            return bool(opt.step_with_ready_grads()), grad_norm
        with self.freezer.armed():  # frozen main params: no update, no weight decay, no Adam-state change
            return bool(opt.step_with_ready_grads()), grad_norm

    def accumulate_grads(self, microbatches: list[dict], full_grads: bool = False) -> torch.Tensor:
        """Forward + backward only: gradients land in `param.main_grad` (DP-reduced, token-averaged), no update.
        The caller zeroes the grad buffers (regularizers estimating a Fisher use it). `full_grads`: reduce by
        all-reduce even with the distributed optimizer, so every rank's whole `main_grad` is final (its
        reduce-scatter leaves only this rank's shard reduced)."""
        for m in self.model:
            m.train()
        with torch.enable_grad():
            return self._run(microbatches, forward_only=False, force_all_reduce=full_grads)

    def min_microbatches(self) -> int:
        """Fewest micro-batches one forward/backward may have (megatron's interleaved schedule needs >= pp)."""
        return self.parallel.pp if self.parallel.vpp else 1

    def model_parallel_group(self):
        """The TP x PP group: a sum over it covers every unique model element once (regularizer penalties)."""
        return self._ps.get_model_parallel_group()

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict]) -> tuple[float, int]:
        """Token-mean loss and token count over `microbatches` (forward only; one host sync at the end)."""
        self.sync_params()
        for m in self.model:
            m.eval()
        s, n = self._run(microbatches, forward_only=True).tolist()
        return s / max(n, 1.0), int(n)

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
