"""Perplexity scoring with a reference causal LM (any HF model directory or a .gguf file).

torch/transformers are imported only when the stage runs; the rest of curate/ stays light.
"""

from __future__ import annotations

import math
from pathlib import Path

from cpt_megatron.curate.config import PerplexityConfig
from cpt_megatron.errors import CptError

__all__ = ["PerplexityScorer"]


class PerplexityScorer:
    def __init__(self, cfg: PerplexityConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(cfg.model)
        if not p.exists():
            raise CptError(f"perplexity.model {cfg.model} not found (an HF causal-LM directory or a .gguf file)")
        kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
        where = str(p.parent) if kw else str(p)
        self.tok = AutoTokenizer.from_pretrained(where, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(where, torch_dtype=torch.float32, **kw).eval()
        self.cfg = cfg
        self.torch = torch

    def score(self, texts: list[str]) -> list[float]:
        """Per-document perplexity over its first `max_tokens` tokens (inf for documents under 2 tokens)."""
        torch = self.torch
        out = []
        for text in texts:  # one at a time: no padding, so scores do not depend on batch composition
            ids = self.tok(text, add_special_tokens=False, truncation=True, max_length=self.cfg.max_tokens)["input_ids"]
            if len(ids) < 2:
                out.append(math.inf)
                continue
            with torch.no_grad():
                x = torch.tensor([ids])
                loss = self.model(input_ids=x, labels=x).loss
            out.append(round(math.exp(float(loss)), 4))
        return out

    def reason(self, ppl: float) -> str | None:
        if self.cfg.max_perplexity is not None and ppl > self.cfg.max_perplexity:
            return f"ppl>{self.cfg.max_perplexity}"
        if self.cfg.min_perplexity is not None and ppl < self.cfg.min_perplexity:
            return f"ppl<{self.cfg.min_perplexity}"
        return None
