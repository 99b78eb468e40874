"""Data stage: indexed .bin/.idx files (streaming writer, merger), preprocessing, and mixtures.

Kept light to import: torch and megatron are only imported by `mixture` (and lazily).
Nothing here imports `cpt_megatron.model` or `cpt_megatron.train`.
"""

__all__ = ["indexed", "preprocess", "mixture"]
