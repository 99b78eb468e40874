"""Corpus curation: read -> normalize -> langid -> length -> quality -> exact/near dedup -> perplexity -> PII.

Light to import (no torch/megatron): data preparation runs on CPU nodes. See docs/curate.md.
"""

from cpt_megatron.curate.config import DEFAULT_STAGES, STAGES, CurateConfig, load_config
from cpt_megatron.curate.pipeline import CurateResult, curate
from cpt_megatron.curate.readers import Doc, DocumentReader, Malformed, read_documents

__all__ = [
    "STAGES",
    "DEFAULT_STAGES",
    "CurateConfig",
    "CurateResult",
    "Doc",
    "DocumentReader",
    "Malformed",
    "curate",
    "load_config",
    "read_documents",
]
