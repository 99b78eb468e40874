"""cpt-megatron: continued pretraining of Llama-family models on megatron-core."""

__version__ = "0.1.0"
__all__ = ["__version__", "CptError"]

from cpt_megatron.errors import CptError  # noqa: E402
