"""Evaluation: per-source perplexity (bits per byte/char), lm-eval benchmarks
(harness: our model in its layout; tasks: offline task runs; benchmarks: in training), the forgetting monitor,
checkpoint selection and run plots. Never imports train/ (the training loop calls into here).

Light to import: torch, transformers, megatron and matplotlib load inside the functions that need them.
"""

__all__ = ["perplexity", "harness", "tasks", "benchmarks", "monitor", "select", "plot", "standalone"]
