"""Training stages that freeze parts of the model (`train.stages`), native in megatron-core layouts.

    train:
      stages:
        - {until: 0.05, trainable: new_vocab_rows, lr: 1.0e-3}   # first 5% of the steps: only the new rows
        - {until: 1.0, trainable: all}

A stage is a pure function of the step (stage = f(step, total steps)), so it needs no checkpoint state: a
run resumed anywhere, also exactly at a boundary, is in the same stage with the same masks as the
uninterrupted run. `trainable` is a comma-separated union of `all`, `embeddings` (input word embeddings
and output layer), `new_vocab_rows` (the rows `cpt resize-embeddings` added, input and output embeddings;
from the base checkpoint's `tokenizer_extension` metadata) and `layers:A-B` (transformer layers A..B,
0-based, inclusive, global numbering).

Frozen means bit-identical, not "zero gradient": AdamW's decoupled weight decay shrinks a row whose
gradient is zero, and non-zero Adam moments keep moving it. So, per optimizer step:

  1. after the DP reduction (and any regularizer), frozen elements' `main_grad` is zeroed, so the grad norm
     and clipping see only what trains;
  2. inside the inner torch optimizer's step (the megatron optimizer has already copied grads to its main
     params: the fp32 copies with bf16, this rank's shard with the distributed optimizer), a fully frozen
     main param gets `grad = None`, which Adam skips (no update, no weight decay, no moment change; its step
     count is advanced like everyone's: megatron-core checkpoints hold one step count for all parameters);
     a partly frozen one (the vocab-parallel embedding / output shard holding old and new rows) has its
     frozen elements of (param, exp_avg, exp_avg_sq) saved before and written back after the update;
  3. megatron then copies main params to the model params and all-gathers them as usual.

Each main param maps to its model param and flat element range: [0, numel) without the distributed
optimizer, the rank's shard range with it; masks are flat intervals of the local (TP-sharded) tensor, so
every TP rank masks its own vocab row range and the tied output layer on the last PP stage is masked like
the embedding on the first.

A stage boundary (the trainable set changes) restarts Adam: moments zeroed, step count 0, as if the next
stage were a fresh run from the current weights (the LR schedule continues). With one shared step count,
tensors frozen so far would otherwise start with zero moments but an advanced step count, i.e. without
Adam's bias-correction warm-up (with beta2 = 0.999 their early updates would be up to ~6x the LR). The
restart happens at the stage's first step, derived from the step, so it is exact on resume too.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import re

import torch

from cpt_megatron.config import parse_trainable
from cpt_megatron.errors import CptError
from cpt_megatron.train.engine import init_adam_state, is_torch_adam

__all__ = ["StagedTraining", "StageSchedule", "Freezer", "check_stages", "stage_ends", "new_vocab_rows"]

_LAYERS = re.compile(r"^layers:(\d+)-(\d+)$")
_EMBED, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"

Intervals = list[tuple[int, int]]  # sorted, disjoint [lo, hi) flat element ranges


def stage_ends(untils: list[float], total_steps: int) -> list[int]:
    """Step index (exclusive) where each stage ends: round(until x total steps); the last ends at total."""
    ends = [min(total_steps, max(0, round(u * total_steps))) for u in untils]
    ends[-1] = total_steps
    return ends


def new_vocab_rows(meta: dict) -> tuple[int, int] | None:
    """[start, end) of the rows `cpt resize-embeddings` added (global vocab ids), from checkpoint metadata."""
    ext = meta.get("tokenizer_extension")
    if not ext:
        return None
    rows = ext.get("new_rows") or (ext["base_vocab_size"], ext["vocab_size"])
    return int(rows[0]), int(rows[1])


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    start: int  # first step index (0-based) in this stage
    end: int  # exclusive
    trainable: tuple[str, ...]
    lr: float | None

    @property
    def name(self) -> str:
        return ",".join(self.trainable)


class StageSchedule:
    """The recipe's stages in steps. `at(k)` = the stage of step index k (the (k+1)-th update)."""

    def __init__(self, stages, total_steps: int):
        ends = stage_ends([s.until for s in stages], total_steps)
        starts = [0] + ends[:-1]
        self.stages = [Stage(i, a, b, tuple(parse_trainable(s.trainable, f"train.stages[{i}].trainable")), s.lr)
                       for i, (s, a, b) in enumerate(zip(stages, starts, ends))]
        self._ends = ends

    def at(self, step: int) -> Stage:
        return self.stages[min(bisect.bisect_right(self._ends, step), len(self.stages) - 1)]

    def lr_factor(self, step: int, base_lr: float) -> float:
        st = self.at(step)
        return 1.0 if st.lr is None else st.lr / base_lr


# ---- masks: which flat elements of each local model tensor train -------------------------------------------
def _layer_of(chunk) -> dict[int, int]:
    """id(param) -> global 0-based transformer layer index, for this chunk's decoder layers."""
    out = {}
    decoder = getattr(chunk, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        for p in layer.parameters():
            out[id(p)] = int(layer.layer_number) - 1
    return out


def trainable_intervals(chunks, trainable: tuple[str, ...], new_rows: tuple[int, int] | None,
                        tp_rank: int) -> dict[torch.nn.Parameter, Intervals | None]:
    """model param -> None (all of it trains) or the flat [lo, hi) intervals that train ([] = frozen)."""
    out: dict = {}
    for chunk in chunks:
        layers = _layer_of(chunk)
        for name, p in chunk.named_parameters():
            if "all" in trainable:
                out[p] = None
                continue
            vocab = name.endswith(_EMBED) or name.endswith(_OUTPUT)
            if vocab and "embeddings" in trainable:
                out[p] = None
                continue
            ivs: Intervals = []
            layer = layers.get(id(p))
            for t in trainable:
                m = _LAYERS.match(t)
                if m and layer is not None and int(m.group(1)) <= layer <= int(m.group(2)):
                    ivs = [(0, p.numel())]
            if vocab and "new_vocab_rows" in trainable and new_rows is not None and not ivs:
                rows, hidden = p.shape[0], p.numel() // p.shape[0]
                lo = max(new_rows[0] - tp_rank * rows, 0)  # vocab-parallel: this TP rank's rows [r*rows, (r+1)*rows)
                hi = min(new_rows[1] - tp_rank * rows, rows)
                if lo < hi:
                    ivs = [(lo * hidden, hi * hidden)]
            out[p] = None if ivs == [(0, p.numel())] else ivs
    return out


def _clip(ivs: Intervals, lo: int, hi: int) -> Intervals:
    """Intervals restricted to [lo, hi), shifted to start at 0."""
    return [(max(a, lo) - lo, min(b, hi) - lo) for a, b in ivs if min(b, hi) > max(a, lo)]


def _complement(ivs: Intervals, n: int) -> Intervals:
    out, cur = [], 0
    for a, b in ivs:
        if a > cur:
            out.append((cur, a))
        cur = b
    if cur < n:
        out.append((cur, n))
    return out


def _main_params(opt):
    """(model param, main param, flat start) for every param this rank's megatron optimizer updates."""
    for o in getattr(opt, "chained_optimizers", [opt]):
        if getattr(o, "is_stub_optimizer", False):
            continue
        if hasattr(o, "_get_model_param_range_map"):  # DistributedOptimizer: this rank's shard of each param
            pairs = [(o.model_float16_groups, o.shard_fp32_from_float16_groups), (o.model_fp32_groups, o.shard_fp32_groups)]
            for model_groups, main_groups in pairs:
                for mg, sg in zip(model_groups, main_groups):
                    for mp, sp in zip(mg, sg):
                        yield o, mp, sp, o._get_model_param_range_map(mp)["param"].start
        elif hasattr(o, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params (bf16 without dist opt)
            for mg, fg in zip(o.float16_groups, o.fp32_from_float16_groups):
                for mp, fp in zip(mg, fg):
                    yield o, mp, fp, 0
            for g in o.fp32_from_fp32_groups:
                for p in g:
                    yield o, p, p, 0
        else:  # FP32Optimizer: the model params are the main params
            for g in o.optimizer.param_groups:
                for p in g["params"]:
                    yield o, p, p, 0


_MOMENTS = ("exp_avg", "exp_avg_sq")


class Freezer:
    """Applies one stage's trainable set to an Engine (see the module docstring for what frozen means)."""

    def __init__(self, engine, new_rows: tuple[int, int] | None, tp_rank: int):
        self.engine, self.new_rows, self.tp_rank = engine, new_rows, tp_rank
        self.trainable: tuple[str, ...] = ("all",)
        self.model_ivs: dict = {}  # model param -> trainable intervals (None = all)
        self.frozen_main: list = []  # (megatron optimizer, main param): skipped by Adam
        self.partial_main: list = []  # (megatron optimizer, main param, frozen intervals within the main param)
        self._armed = False
        self._wrapped = set()

    @property
    def active(self) -> bool:
        return "all" not in self.trainable

    def set_stage(self, trainable: tuple[str, ...], *, restart: bool = False) -> None:
        """Masks for `trainable`; `restart` (the first step of a stage after the first): fresh Adam state."""
        self.trainable = tuple(trainable)
        self.model_ivs, self.frozen_main, self.partial_main = {}, [], []
        if restart:
            restart_adam(self.engine.optimizer)
        if not self.active:
            return
        self.model_ivs = trainable_intervals(self.engine.chunks, self.trainable, self.new_rows, self.tp_rank)
        for o, mp, main, start in _main_params(self.engine.optimizer):
            ivs = self.model_ivs.get(mp)
            if ivs is None:
                continue
            mine = _clip(ivs, start, start + main.numel())
            if not mine:
                self.frozen_main.append((o, main))
            elif mine != [(0, main.numel())]:
                self.partial_main.append((o, main, _complement(mine, main.numel())))
            self._wrap(o)

    def counts(self) -> tuple[int, int]:
        """(trainable, total) elements of this rank's model params."""
        total = train = 0
        for c in self.engine.chunks:
            for p in c.parameters():
                total += p.numel()
                ivs = self.model_ivs.get(p) if self.active else None
                train += p.numel() if ivs is None else sum(b - a for a, b in ivs)
        return train, total

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero frozen elements of each model param's (DP-reduced) main_grad: grad norm and clipping exclude them."""
        if not self.active:
            return
        for p, ivs in self.model_ivs.items():
            if ivs is None:
                continue
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is None:
                continue
            flat = g.view(-1)
            for a, b in _complement(ivs, p.numel()):
                flat[a:b].zero_()

    @contextlib.contextmanager
    def armed(self):
        """The inner optimizers' step applies the masks only inside this (not, e.g., in megatron's dummy
        state-initialization step when a distributed-optimizer checkpoint is loaded)."""
        self._armed = self.active
        try:
            yield
        finally:
            self._armed = False

    def _wrap(self, o) -> None:
        inner = o.optimizer
        if id(inner) in self._wrapped:
            return
        self._wrapped.add(id(inner))
        orig = inner.step

        def step(*args, **kwargs):
            if not self._armed:
                return orig(*args, **kwargs)
            return self._masked_step(o, orig, *args, **kwargs)

        inner.step = step

    @torch.no_grad()
    def _masked_step(self, o, orig, *args, **kwargs):
        inner = o.optimizer
        frozen = [p for oo, p in self.frozen_main if oo is o]
        if any(not inner.state.get(p) for p in frozen):
            # checkpoints hold every param's state: create the frozen params' (zero) state now, as megatron does
            init_adam_state(o)
        for p in frozen:
            p.grad = None  # Adam skips it: no update, no weight decay, no moment change
        saved = []
        for oo, p, ivs in self.partial_main:
            if oo is o:
                st = inner.state.get(p, {})
                tensors = [p.data] + [st[k] for k in _MOMENTS if k in st]
                saved.append((p, ivs, [[t.view(-1)[a:b].clone() for a, b in ivs] for t in tensors]))
        out = orig(*args, **kwargs)
        for p, ivs, copies in saved:
            st = inner.state[p]
            tensors = [p.data] + [st[k] for k in _MOMENTS if k in st]
            for t, cs in zip(tensors, copies):
                for (a, b), c in zip(ivs, cs):
                    t.view(-1)[a:b].copy_(c)
            if len(copies) == 1:  # the state was created by this very step: frozen moments stay zero
                for k in _MOMENTS:
                    for a, b in ivs:
                        st[k].view(-1)[a:b].zero_()
        if is_torch_adam(inner):  # megatron keeps ONE step count for all params (checkpoints require it)
            for p in frozen:
                inner.state[p]["step"] = inner.state[p]["step"] + 1
        return out


def restart_adam(optimizer) -> None:
    """Zero every Adam moment and step count of this rank (a stage boundary: as if a fresh run started from the
    current weights). megatron-core keeps one step count for all parameters, so rows/tensors frozen so far would
    otherwise start with zero moments but an advanced step, i.e. without Adam's bias-correction warm-up."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(o, "is_stub_optimizer", False):
            continue
        inner = o.optimizer
        for g in inner.param_groups:
            if "step" in g:
                g["step"] = 0
        for st in inner.state.values():
            for k, v in list(st.items()):
                if k == "step":
                    st[k] = torch.zeros_like(v) if torch.is_tensor(v) else 0
                elif torch.is_tensor(v) and k in _MOMENTS:
                    v.zero_()


class StagedTraining:
    """`train.stages` for a run: which stage a step is in, its LR factor, and the Engine's Freezer."""

    def __init__(self, stages, total_steps: int, engine, meta: dict, tp_rank: int, base_lr: float):
        self.schedule = StageSchedule(stages, total_steps)
        self.base_lr = base_lr
        self.freezer = Freezer(engine, new_vocab_rows(meta), tp_rank)
        engine.freezer = self.freezer
        self.current: Stage | None = None

    def begin_step(self, step: int) -> Stage | None:
        """Before update `step` (0-based): set this step's masks. Returns the stage when it starts here (or at this
        launch's first step), for the log; None otherwise."""
        st = self.schedule.at(step)
        if self.current is not None and st.index == self.current.index:
            return None
        restart = step == st.start and st.index > 0 and self.schedule.stages[st.index - 1].trainable != st.trainable
        self.freezer.set_stage(st.trainable, restart=restart)
        self.current = st
        return st

    def lr_factor(self, step: int) -> float:
        return self.schedule.lr_factor(step, self.base_lr)

    def describe(self, st: Stage) -> str:
        n, total = self.freezer.counts()
        lr = "" if st.lr is None else f", lr {st.lr:g}"
        return (f"stage {st.index + 1}/{len(self.schedule.stages)} (steps {st.start}-{st.end - 1}): trainable "
                f"{st.name}{lr}; {n:,} of {total:,} parameters of this rank train")


def check_stages(stages, meta: dict, base: str, num_layers: int) -> None:
    """Before any process starts: `new_vocab_rows` needs the base checkpoint's resize metadata; layer ranges exist."""
    for i, st in enumerate(stages):
        for part in parse_trainable(st.trainable):
            if part == "new_vocab_rows" and new_vocab_rows(meta) is None:
                raise CptError(f"train.stages uses new_vocab_rows but {base} has no tokenizer_extension metadata; "
                               "make the base with `cpt resize-embeddings` (or use trainable: embeddings)")
            m = _LAYERS.match(part)
            if m and int(m.group(2)) >= num_layers:
                raise CptError(f"train.stages[{i}].trainable={st.trainable!r}: the model has layers 0-{num_layers - 1}")
