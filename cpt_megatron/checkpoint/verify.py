"""`cpt verify`: transformers vs megatron-core (any TP/PP/VPP layout, fp32) on the same token batches.

The megatron forward is run stage by stage here (hidden states passed with point-to-point sends over
the pipeline group) rather than through megatron's schedules, because we need the logits, not a loss.
TP logits are vocab-sharded: gathered with megatron's `gather_from_tensor_model_parallel_region`.
Results are computed on the last pipeline stage (TP rank 0) and broadcast, so every rank returns them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import ModelArch
from cpt_megatron.runtime.device import comm_device, current_device

__all__ = ["verify_checkpoint", "check_parity", "megatron_logits", "compare_logits"]


def default_tol(arch: ModelArch) -> float:
    """fp32 parity threshold: 1e-4 for tiny test models, 1e-3 for real ones (deeper/wider accumulations)."""
    return 1e-4 if arch.hidden_size * arch.num_layers <= 4096 else 1e-3


def check_parity(res: dict, arch: ModelArch, *, tol: float | None = None, what: str = "verify") -> None:
    tol = default_tol(arch) if tol is None else tol
    if not res["max_abs_diff"] <= tol:
        raise CptError(
            f"{what}: parity check FAILED: max |logit diff| {res['max_abs_diff']:.3g} > {tol:g} "
            f"(mean {res['mean_abs_diff']:.3g}, top-1 agreement {res['top1_agreement']:.4f}); the conversion is wrong"
        )


def compare_logits(hf: torch.Tensor, mc: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Logits [b, s, V] of both models on `tokens` [b, s]; losses are next-token cross-entropies."""
    import torch.nn.functional as F

    diff = (hf - mc).abs()
    labels = tokens[:, 1:].reshape(-1)
    hf, mc = hf[:, :-1], mc[:, :-1]
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((hf.argmax(-1) == mc.argmax(-1)).float().mean()),
        "loss_hf": float(F.cross_entropy(hf.reshape(-1, hf.shape[-1]), labels)),
        "loss_mcore": float(F.cross_entropy(mc.reshape(-1, mc.shape[-1]), labels)),
    }


def _pp_ranks():
    from megatron.core import parallel_state as ps

    return torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())


@torch.no_grad()
def megatron_logits(chunks, tokens: torch.Tensor, true_vocab: int, parallel) -> torch.Tensor | None:
    """Full-vocab logits [b, s, true_vocab] on the last PP stage (every TP rank), on the model's device
    (`current_device()`); None elsewhere. `tokens` may live anywhere: they are moved to that device."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pp, vpp = parallel.pp, parallel.vpp or 1
    pp_rank = ps.get_pipeline_model_parallel_rank()
    ranks = _pp_ranks()
    dev = current_device()
    tokens = tokens.to(dev)
    b, s = tokens.shape
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    hidden_shape = (s, b, chunks[0].config.hidden_size)
    dtype = chunks[0].config.params_dtype
    logits = None
    for c in chunks:
        c.eval()
    for stage in range(pp * vpp):
        owner, v = stage % pp, stage // pp
        if owner != pp_rank:
            continue
        chunk = chunks[v]
        if stage > 0:
            buf = torch.empty(hidden_shape, dtype=dtype, device=dev)
            torch.distributed.recv(buf, src=ranks[(stage - 1) % pp])
            chunk.set_input_tensor(buf)
        out = chunk(tokens, pos, None)
        if stage < pp * vpp - 1:
            torch.distributed.send(out.contiguous(), dst=ranks[(stage + 1) % pp])
        else:
            logits = gather_from_tensor_model_parallel_region(out)[..., :true_vocab].float()
    return logits


def _hf_logits(hf_dir, tokens: torch.Tensor, round_to: torch.dtype | None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from cpt_megatron.utils import hf_quiet

    with hf_quiet():
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    _round_params(model, round_to)
    with torch.no_grad():
        return model(tokens).logits.float()


def _round_params(model, dtype: torch.dtype | None) -> None:
    """Round weights through `dtype` (kept fp32): both sides then hold identical values when one side is bf16."""
    if dtype is None or dtype == torch.float32:
        return
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def _weights_dtype(hf_dir, ckpt_dir) -> torch.dtype:
    """The lowest precision either side stores (bf16/fp16 when one of them does), for a like-for-like check."""
    import json

    from cpt_megatron.checkpoint.io import DTYPES, read_meta

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    names = [read_meta(ckpt_dir).get("dtype"), cfg.get("dtype") or cfg.get("torch_dtype")]
    low = [DTYPES[n] for n in names if n in DTYPES and DTYPES[n] != torch.float32]
    return low[0] if low else torch.float32


def _batch(arch: ModelArch, batch: int, seq_len: int, seed: int, text: str | None, ckpt_dir) -> torch.Tensor:
    if text:
        from cpt_megatron.checkpoint.io import TOKENIZER_DIR
        from cpt_megatron.tokenizer.load import load_tokenizer

        tok = load_tokenizer(os.path.join(ckpt_dir, TOKENIZER_DIR))
        ids = tok.encode(text, add_special_tokens=False)
        need = batch * seq_len
        if len(ids) < need:
            ids = (ids * (need // max(1, len(ids)) + 1))
        return torch.tensor(ids[:need], device="cpu").view(batch, seq_len)
    g = torch.Generator().manual_seed(seed)  # host tokens (same on every machine); megatron_logits moves them
    return torch.randint(0, arch.vocab_size, (batch, seq_len), generator=g, device="cpu")


def verify_checkpoint(hf_dir, ckpt_dir, *, tp: int = 1, pp: int = 1, vpp: int | None = None, batch: int = 2,
                      seq_len: int = 32, seed: int = 0, text: str | None = None) -> dict:
    """Compare transformers(hf_dir) with megatron-core loaded from ckpt_dir in layout tp/pp/vpp (fp32, eval).

    Collective: call on every rank of a world of size tp*pp (a 1-rank world is created when absent).
    Returns the same dict on every rank.
    """
    from megatron.core import parallel_state as ps

    from cpt_megatron.checkpoint.io import arch_from_ckpt, load_model_weights
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed

    arch = arch_from_ckpt(ckpt_dir)
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    owns_group = not torch.distributed.is_initialized()
    denv = init_distributed(parallel, seed=seed)
    try:
        if denv.world_size != tp * pp:
            raise CptError(f"verify needs exactly tp*pp = {tp * pp} processes, got {denv.world_size} (use --nproc)")
        # the spec training uses (TE when present, local otherwise), fp32, no compile; weights come from ckpt_dir
        chunks = build_model(arch, parallel, ModelOptions(dtype="fp32", spec="auto", compile="off", initialize=False))
        spec = chunks[0].kernel_spec
        load_model_weights(chunks, ckpt_dir)
        round_to = _weights_dtype(hf_dir, ckpt_dir)
        for c in chunks:
            _round_params(c, round_to)
        tokens = _batch(arch, batch, seq_len, seed, text, ckpt_dir)
        mc = megatron_logits(chunks, tokens, arch.vocab_size, parallel)
        mc = None if mc is None else mc.cpu()  # compared with transformers' fp32 logits on the CPU
        del chunks
        reporter = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
        result = [None]
        if reporter:
            hf = _hf_logits(hf_dir, tokens, round_to)
            if hf.shape[-1] < arch.vocab_size:
                raise CptError(f"{hf_dir} has {hf.shape[-1]} vocab rows but the checkpoint {arch.vocab_size}")
            result[0] = compare_logits(hf[..., : arch.vocab_size], mc, tokens)
            result[0].update(tp=tp, pp=pp, vpp=vpp, batch=batch, seq_len=seq_len, model_type=arch.model_type, spec=spec,
                             weights_dtype=str(round_to).replace("torch.", ""))
        torch.distributed.broadcast_object_list(result, src=_reporter_rank())
        return result[0]
    finally:
        if owns_group:
            destroy_distributed()  # also removes the CPU redirects it installed
        elif ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()




def _reporter_rank() -> int:
    """Global rank of the last pipeline stage's TP rank 0 (DP rank 0), which holds the comparison."""
    from megatron.core import parallel_state as ps

    dev = comm_device()  # NCCL moves device tensors; a gloo group (conversion) moves CPU ones
    flag = torch.tensor([1 if (ps.is_pipeline_last_stage(ignore_virtual=True)
                               and ps.get_tensor_model_parallel_rank() == 0
                               and ps.get_data_parallel_rank() == 0) else 0], device=dev)
    flags = [torch.zeros(1, dtype=flag.dtype, device=dev) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(flags, flag)
    return int(torch.cat(flags).argmax())
