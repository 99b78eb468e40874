"""Model layer: HF Llama-family config -> megatron-core GPTModel (TE spec or local spec + SDPA)."""

from cpt_megatron.model.arch import SUPPORTED_MODEL_TYPES, ModelArch, load_hf_config, padded_vocab_size
from cpt_megatron.model.build import ModelOptions, build_model, model_dtype, transformer_config
from cpt_megatron.model.sharding import (
    global_init_tensor,
    global_shape,
    load_global_tensors,
    local_param_specs,
)
from cpt_megatron.model.specs import KernelChoice, select_kernels

__all__ = [
    "ModelArch", "SUPPORTED_MODEL_TYPES", "load_hf_config", "padded_vocab_size", "ModelOptions", "build_model",
    "model_dtype", "transformer_config", "KernelChoice", "select_kernels", "load_global_tensors",
    "local_param_specs", "global_init_tensor", "global_shape",
]
