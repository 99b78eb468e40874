"""Model layer: HF Llama-family config -> megatron-core GPTModel (TE spec or local spec + SDPA).

The names below load on first use, so `cpt_megatron.model.arch` (pure Python: the config parser the
estimator and data tools share) does not pull in torch and megatron-core.
"""

import importlib

_WHERE = {
    "ModelArch": "arch", "SUPPORTED_MODEL_TYPES": "arch", "load_hf_config": "arch", "padded_vocab_size": "arch",
    "ModelOptions": "build", "build_model": "build", "model_dtype": "build", "transformer_config": "build",
    "global_init_tensor": "sharding", "global_shape": "sharding", "load_global_tensors": "sharding",
    "local_param_specs": "sharding", "KernelChoice": "specs", "select_kernels": "specs",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
