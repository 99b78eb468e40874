"""Build megatron-core GPTModel chunks for a ModelArch under the current parallel state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpt_megatron.config import ModelOptions
from cpt_megatron.errors import CptError
from cpt_megatron.model import kernels as _kernels
from cpt_megatron.model.arch import ModelArch, padded_vocab_size
from cpt_megatron.model.specs import KernelChoice, layer_spec, select_kernels
from cpt_megatron.runtime.device import current_device, on_gpu

__all__ = ["ModelOptions", "transformer_config", "build_model", "model_dtype", "check_te_features", "FP8_CHOICES",
           "grad_accum_fusion_available"]

FP8_CHOICES = (None, "hybrid", "e4m3")
"""train.fp8: None (bf16) | hybrid (e4m3 forward, e5m2 gradients) | e4m3 (both): Transformer Engine only."""


def model_dtype(opts: ModelOptions) -> torch.dtype:
    if opts.dtype == "auto":
        return torch.bfloat16 if on_gpu() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.dtype]


def grad_accum_fusion_available() -> bool:
    """megatron's gradient_accumulation_fusion: NVIDIA apex's fused_weight_gradient_mlp_cuda kernel is needed even
    with the TE spec (the output layer is megatron's own ColumnParallelLinear); the NGC images ship it."""
    if not on_gpu():
        return False
    from cpt_megatron.utils import have_module

    return have_module("fused_weight_gradient_mlp_cuda")


def check_te_features(parallel, spec: str, fp8: str | None = None) -> None:
    """Transformer Engine features (fp8, context parallel, TP comm overlap) need the TE spec on CUDA; one line each."""
    if fp8 not in FP8_CHOICES:
        raise CptError(f"train.fp8 must be null|hybrid|e4m3, got {fp8!r}")
    why = None if spec == "te" else ("model.options.spec=local" if spec == "local" else
                                     "Transformer Engine is not importable (or there is no CUDA)")
    cp, overlap = getattr(parallel, "cp", 1), getattr(parallel, "tp_comm_overlap", False)
    if fp8 and why:
        raise CptError(f"train.fp8={fp8} needs the Transformer Engine spec, but {why}; remove train.fp8 or install TE")
    if cp > 1 and why:
        raise CptError(f"parallel.cp={cp} (context parallel) needs Transformer Engine attention, but {why}; set parallel.cp=1")
    if overlap:
        if why:
            raise CptError(f"parallel.tp_comm_overlap needs Transformer Engine userbuffers, but {why}; set it false")
        if parallel.tp < 2 or not parallel.sp:
            raise CptError(f"parallel.tp_comm_overlap needs parallel.tp > 1 and parallel.sp=true "
                           f"(got tp={parallel.tp}, sp={parallel.sp})")


def transformer_config(arch: ModelArch, parallel, opts: ModelOptions, kernels: KernelChoice | None = None,
                       plan: _kernels.KernelPlan | None = None, fp8: str | None = None):
    from megatron.core.transformer import TransformerConfig

    kernels = kernels or select_kernels(opts.spec)
    plan = plan or _kernels.resolve_kernels(opts, tp=parallel.tp, sp=parallel.sp, spec=kernels.spec)
    arch.check_parallel(parallel.tp)
    check_te_features(parallel, kernels.spec, fp8)
    dtype = model_dtype(opts)
    cuda = on_gpu()
    kw = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,  # the default is gelu even with gated_linear_unit
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=opts.init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        context_parallel_size=getattr(parallel, "cp", 1),
        tp_comm_overlap=getattr(parallel, "tp_comm_overlap", False),
        # GPU: each rank initializes its own shards on its GPU (no full fp32 copy on the host first); CPU: as before
        use_cpu_initialization=not cuda,
        perform_initialization=opts.initialize,
        bias_activation_fusion=plan.fused_swiglu == "on",
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=plan.fused_rope == "te",
        persist_layer_norm=False,
        # fused wgrad GEMM accumulating into main_grad (Megatron-LM default) when its kernel exists
        gradient_accumulation_fusion=grad_accum_fusion_available(),
        deallocate_pipeline_outputs=cuda,
        variable_seq_lengths=False,
        # gloo's batched isend/irecv corrupts interleaved-1F1B (vpp) exchanges on CPU; plain p2p is exact
        batch_p2p_comm=cuda,
        calculate_per_token_loss=True,  # exact token-mean loss whatever the layout / microbatching
        cuda_graph_scope=[],  # megatron-core's default "full", which its own __post_init__ warns is deprecated
    )
    if fp8:
        kw.update(fp8=fp8, fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=1024,
                  fp8_amax_compute_algo="max", fp8_param=False)
    if opts.recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif opts.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kw)


def build_model(arch: ModelArch, parallel, opts: ModelOptions | None = None, kernels: KernelChoice | None = None,
                fp8: str | None = None):
    """Model chunks for this rank (one per virtual pipeline stage), on `current_device()`, not DDP-wrapped.

    fp8: train.fp8 (TE spec only, checked by `check_te_features`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    opts = opts or ModelOptions()
    kernels = kernels or select_kernels(opts.spec)
    plan = _kernels.resolve_kernels(opts, tp=parallel.tp, sp=parallel.sp, spec=kernels.spec)
    config = transformer_config(arch, parallel, opts, kernels, plan, fp8=fp8)
    if plan.fused_rope == "compile":
        _kernels.install_rope(config)
    spec, final_norm = layer_spec(kernels, plan=plan)
    true_vocab = opts.vocab_size or arch.vocab_size
    vocab = padded_vocab_size(true_vocab, parallel.tp, opts.make_vocab_size_divisible_by)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for vp in range(parallel.vpp or 1):
        vp_stage = vp if parallel.vpp else None
        n_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        block = TransformerBlockSubmodules(layer_specs=[spec] * n_layers, layer_norm=final_norm)
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            vp_stage=vp_stage,
        )
        if post and vocab > true_vocab:
            _mask_vocab_padding(model, true_vocab, vocab)
        if post and plan.fused_ce != "off":
            _kernels.install_fused_ce(model, plan.fused_ce, true_vocab)
        model.to(current_device())
        if not opts.initialize:  # deterministic contents for rows no checkpoint fills (vocab padding of another TP)
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        # HF-exact rotary frequencies (llama3 scaling with any low/high/original values); a plain attribute, so
        # it is placed here, after the move
        if hasattr(model, "rotary_pos_emb"):
            model.rotary_pos_emb.inv_freq = arch.rope_inv_freq().to(current_device())
        if plan.compile == "layer":
            _kernels.compile_layers(model)
        model.kernel_plan = plan  # shown by `cpt env` and the throughput bench
        model.kernel_spec = kernels.spec  # "te" | "local": what verify/eval report
        chunks.append(model)
    return chunks


def _mask_vocab_padding(model, true_vocab: int, padded_vocab: int) -> None:
    """Padded vocab rows must not take probability mass: their logits are set to the dtype's minimum.

    Without this the loss (and HF parity) would depend on the padding, i.e. on TP size.
    """
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    per_rank = padded_vocab // tp
    start = rank * per_rank
    first_pad = max(0, true_vocab - start)  # local index of the first padding row
    if padded_vocab == true_vocab:
        return

    def hook(_module, _inputs, output):
        logits, bias = output
        if not torch.is_tensor(logits):  # fused linear-CE: it slices the padding rows off the weight itself
            return None
        # gathered over TP (runtime_gather_output: megatron-core's inference path, e.g. the KV-cached
        # decoding in eval/harness.py): every rank holds the whole padded vocab
        first = true_vocab if tp > 1 and logits.shape[-1] == padded_vocab else first_pad
        if first >= logits.shape[-1]:
            return None
        logits = logits.clone()
        logits[..., first:] = torch.finfo(logits.dtype).min
        return logits, bias

    model.output_layer.register_forward_hook(hook)
