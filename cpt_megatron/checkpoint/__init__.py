"""Checkpoints: HF <-> megatron-core torch_dist (streaming), parity verification, embedding resize."""

from cpt_megatron.checkpoint.io import arch_from_ckpt, load_model_weights, read_meta

__all__ = ["load_model_weights", "read_meta", "arch_from_ckpt", "import_hf", "export_hf", "verify_checkpoint",
           "resize_embeddings"]


def __getattr__(name):  # heavy entry points load lazily (transformers, megatron)
    if name == "import_hf":
        from cpt_megatron.checkpoint.hf_import import import_hf
        return import_hf
    if name == "export_hf":
        from cpt_megatron.checkpoint.hf_export import export_hf
        return export_hf
    if name == "verify_checkpoint":
        from cpt_megatron.checkpoint.verify import verify_checkpoint
        return verify_checkpoint
    if name == "resize_embeddings":
        from cpt_megatron.checkpoint.resize import resize_embeddings
        return resize_embeddings
    raise AttributeError(name)
