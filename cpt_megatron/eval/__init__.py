"""Evaluation: per-source perplexity (bits per byte/char), choice benchmarks, the forgetting monitor,
checkpoint selection and run plots. Never imports train/ (the training loop calls into here).

Light to import: torch, transformers, megatron and matplotlib load inside the functions that need them.
"""

__all__ = ["perplexity", "choice", "monitor", "select", "plot", "standalone"]
