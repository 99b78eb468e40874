"""Build megatron-core GPTModel chunks for a ModelArch under the current parallel state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpt_megatron.config import ModelOptions
from cpt_megatron.model import kernels as _kernels
from cpt_megatron.model.arch import ModelArch, padded_vocab_size
from cpt_megatron.model.specs import KernelChoice, layer_spec, select_kernels

__all__ = ["ModelOptions", "transformer_config", "build_model", "model_dtype"]


def model_dtype(opts: ModelOptions) -> torch.dtype:
    if opts.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.dtype]


def transformer_config(arch: ModelArch, parallel, opts: ModelOptions, kernels: KernelChoice | None = None,
                       plan: _kernels.KernelPlan | None = None):
    from megatron.core.transformer import TransformerConfig

    kernels = kernels or select_kernels(opts.spec)
    plan = plan or _kernels.resolve_kernels(opts, tp=parallel.tp, sp=parallel.sp, spec=kernels.spec)
    arch.check_parallel(parallel.tp)
    dtype = model_dtype(opts)
    cuda = torch.cuda.is_available()
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
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_activation_fusion=plan.fused_swiglu == "on",
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=plan.fused_rope == "te",
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=cuda,
        variable_seq_lengths=False,
        # gloo's batched isend/irecv corrupts interleaved-1F1B (vpp) exchanges on CPU; plain p2p is exact
        batch_p2p_comm=cuda,
        calculate_per_token_loss=True,  # exact token-mean loss whatever the layout / microbatching
    )
    if opts.recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif opts.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kw)


def build_model(arch: ModelArch, parallel, opts: ModelOptions | None = None, kernels: KernelChoice | None = None):
    """Model chunks for this rank (one per virtual pipeline stage), on the compute device, not DDP-wrapped."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    opts = opts or ModelOptions()
    kernels = kernels or select_kernels(opts.spec)
    plan = _kernels.resolve_kernels(opts, tp=parallel.tp, sp=parallel.sp, spec=kernels.spec)
    config = transformer_config(arch, parallel, opts, kernels, plan)
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
        # HF-exact rotary frequencies (llama3 scaling with any low/high/original values).
        if hasattr(model, "rotary_pos_emb"):
            model.rotary_pos_emb.inv_freq = arch.rope_inv_freq().to(model.rotary_pos_emb.inv_freq.device)
        if post and vocab > true_vocab:
            _mask_vocab_padding(model, true_vocab, vocab)
        if post and plan.fused_ce != "off":
            _kernels.install_fused_ce(model, plan.fused_ce, true_vocab)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if plan.compile == "layer":
            _kernels.compile_layers(model)
        model.kernel_plan = plan  # shown by `cpt env` and the throughput bench
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
    if first_pad >= per_rank:
        return

    def hook(_module, _inputs, output):
        logits, bias = output
        if not torch.is_tensor(logits):  # fused linear-CE: it slices the padding rows off the weight itself
            return None
        logits = logits.clone()
        logits[..., first_pad:] = torch.finfo(logits.dtype).min
        return logits, bias

    model.output_layer.register_forward_hook(hook)
