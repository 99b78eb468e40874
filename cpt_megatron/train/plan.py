"""What a recipe asks the trainer for, computed once: the number of steps and the training mixture.

`cpt prepare` (warming megatron's index caches), `cpt train` (every rank), the dry run and the demo build
the mixture through `recipe_mixture`, so they resolve the same samples from the same sources.
"""

from __future__ import annotations

import math
from pathlib import Path

from cpt_megatron.config import RecipeConfig

__all__ = ["plan_steps", "mixture_config", "recipe_mixture"]


def plan_steps(cfg: RecipeConfig) -> int:
    """Optimizer steps for the whole run: train.max_steps, or train.tokens / tokens per step (rounded up)."""
    if cfg.train.max_steps is not None:
        return int(cfg.train.max_steps)
    return max(1, math.ceil(cfg.train.tokens / (cfg.train.global_batch * cfg.data.seq_len)))


def mixture_config(cfg: RecipeConfig, prefixes: dict[str, str], phases: list | None = None):
    """The recipe's data section as a MixtureConfig over prepared datasets (`prefixes`: source name -> prefix).
    Weights, token budgets, alpha and phases come from the recipe, so they can change without re-preparing."""
    from cpt_megatron.data.mixture import MixtureConfig, SourceConfig

    d = cfg.data
    return MixtureConfig(
        sources=[SourceConfig(name=s.name, prefix=prefixes[s.name], group=s.group, weight=s.weight, tokens=s.tokens)
                 for s in d.sources],
        alpha=d.alpha, phases=list(d.phases if phases is None else phases), valid_fraction=d.valid_fraction,
        seed=d.seed, max_epochs_warn=d.max_epochs_warn)


def recipe_mixture(cfg: RecipeConfig, prepared: dict, *, valid_samples: int, phases: list | None = None):
    """Train/valid datasets of the recipe over the prepared data (`cpt prepare`'s manifest)."""
    from cpt_megatron.data.mixture import build_mixture

    prefixes = {s["name"]: s["prefix"] for s in prepared["sources"]}
    return build_mixture(mixture_config(cfg, prefixes, phases), seq_len=cfg.data.seq_len,
                         train_samples=plan_steps(cfg) * cfg.train.global_batch, valid_samples=valid_samples,
                         cache_dir=str(Path(cfg.data.cache_dir) / "indices"),
                         tokenizer_vocab_size=int(prepared["vocab_size"]), eod_id=int(prepared["eod_id"]))
