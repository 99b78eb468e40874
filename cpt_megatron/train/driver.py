"""`cpt train`: continued pretraining on megatron-core. Reads top to bottom:

check (prepared data matches the recipe, every recipe check; nothing written yet) -> set up (process groups,
config.yaml, state, mixture, model + base weights, optimizer, regularizer, resume, logger, evaluator) -> loop
(lr, batch, step, log, stability, eval + monitor, save, preemption) -> final save and evaluation.
Data preparation is not done here: `cpt prepare` (train/prepare.py) does it first, as its own step.

Data order: step k uses global samples [k*G, (k+1)*G) of the mixture (G = global batch); DP rank r takes
the r-th contiguous slice. The sequence therefore depends only on the step, not on the layout, so a run
resumed with another DP size continues the same samples, and every layout sees the same global batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cpt_megatron.config import RecipeConfig, to_dict
from cpt_megatron.runtime import destroy_distributed, dist_env, init_distributed, on_gpu
from cpt_megatron.train.batches import rank_microbatches
from cpt_megatron.train.checkpointing import (
    discard_after,
    iter_name,
    load_checkpoint,
    prune_checkpoints,
    read_run_state,
    save_checkpoint,
    select_resume,
)
from cpt_megatron.train.checks import check_recipe, check_run_dir
from cpt_megatron.train.metrics import cut_logs
from cpt_megatron.train.plan import plan_steps, recipe_mixture
from cpt_megatron.train.prepare import check_tokenizer_fits, load_prepared, prepare_command, verify_prepared
from cpt_megatron.train.runlock import hold_run_lock
from cpt_megatron.train.saveguard import save_guard
from cpt_megatron.train.schedule import lr_at
from cpt_megatron.train.signals import PREEMPT_EXIT_CODE, PreemptionHandler
from cpt_megatron.train.stability import StabilityGuard
from cpt_megatron.train.state import RecipeFingerprint, RunState, TrainState

__all__ = ["train", "TrainResult", "plan_steps"]


@dataclasses.dataclass
class TrainResult:
    losses: list[float]
    first_step: int
    last_step: int
    run_dir: str
    exit_code: int = 0
    stopped: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Evaluator:
    """Fixed validation micro-batches per source, evaluated in the training layout (forward-only schedules)
    through cpt_megatron.eval (one definition of loss/ppl/bits-per-byte)."""

    def __init__(self, mixture, groups: dict, tokenizer, n_batches: int, micro: int, dp_rank: int, dp: int,
                 heldout: list | None = None, seq_len: int | None = None):
        from cpt_megatron.eval.perplexity import batches_from_dataset, batches_from_file
        from cpt_megatron.train.prepare import resolve_path

        self.sources = {}
        for name, ds in mixture.valid.items():
            n = min(len(ds), n_batches * micro * dp)
            if n == 0:
                continue
            sb = batches_from_dataset(ds, name=name, group=groups[name], micro_batch=micro, max_samples=n,
                                      dp_rank=dp_rank, dp=dp)
            # bytes/chars of the scored text, for tokenizer-independent bits per byte / per char
            text = tokenizer.decode(torch.cat([torch.as_tensor(ds[i]["labels"]) for i in range(n)]).tolist())
            sb.num_bytes, sb.num_chars = len(text.encode()), len(text)
            self.sources[name] = sb
        # eval.general: held-out general text (no training source contains it, `cpt prepare` checked); with it,
        # the replay sources' validation tails are logged as group "replay" and are not what the monitor watches
        self.replay = {n for n, g in groups.items() if g == "general"} if heldout else set()
        for h in heldout or []:
            self.sources[h.name] = batches_from_file(
                resolve_path(h.path), tokenizer, name=h.name, group="general", seq_len=seq_len, micro_batch=micro,
                max_tokens=h.max_tokens or n_batches * micro * dp * seq_len, dp_rank=dp_rank, dp=dp,
                text_key=h.text_key)

    def __call__(self, engine) -> dict:
        from cpt_megatron.eval.perplexity import evaluate_sources

        res = evaluate_sources(engine.eval_step, self.sources)
        for name in self.replay & set(res):
            res[name]["group"] = "replay"
        return res


def train(cfg: RecipeConfig, overrides: list[str] | None = None, *, recipe: str | None = None) -> TrainResult:
    """Train `cfg` on the data `cpt prepare --recipe RECIPE OVERRIDES` prepared (every rank calls this)."""
    from cpt_megatron.checkpoint import arch_from_ckpt

    # ---- check: read-only, on every rank, before any process group or file exists ----------------------
    check_run_dir(cfg)  # run.dir holds no other recipe's run
    prepared = load_prepared(cfg, prepare_command(recipe, overrides))
    arch = arch_from_ckpt(prepared["base"], prepared["tokenizer"])  # the tokenizer: a Megatron-LM base
    check_recipe(cfg, dist_env().world_size, arch, prepared)
    if cfg.train.stages:  # new_vocab_rows needs the base's resize metadata, layers:A-B existing layers
        from cpt_megatron.checkpoint import read_meta
        from cpt_megatron.train.stages import check_stages

        check_stages(cfg.train.stages, read_meta(prepared["base"]), prepared["base"], arch.num_layers)
    run_dir = Path(cfg.run.dir)

    run_lock = hold_run_lock(run_dir, dist_env().rank)  # one trainer per run.dir (rank 0 holds it)
    preempt = None
    try:
        denv = init_distributed(cfg.parallel, seed=cfg.run.seed)
        # the newest complete + verified checkpoint: rank 0 scans (under the lock) and broadcasts the answer
        resume_from, skipped = select_resume(run_dir, cfg.resume)
        for line in skipped if denv.rank == 0 else ():
            print(f"resume: skipped {line}", flush=True)
        done = _finished(cfg, resume_from)
        if done is not None:  # no step will read the data or need the model: nothing is verified or built
            for line in done[1] if denv.rank == 0 else ():
                print(line, flush=True)
            return TrainResult([], done[0] + 1, done[0], str(run_dir))
        verify_prepared(prepared, cfg.data.verify)  # before step 1: rank 0 checksums the data, verdict broadcast
        preempt = PreemptionHandler()
        if denv.rank == 0:
            _write_config(run_dir, cfg, overrides)
        trainer = _Trainer(cfg, prepared, arch, denv, resume_from)
        return trainer.run(preempt)
    finally:
        if preempt is not None:
            preempt.restore()
        destroy_distributed()
        if run_lock is not None:
            run_lock.release()


def _finished(cfg: RecipeConfig, resume_from: Path | None) -> tuple[int, list[str]] | None:
    """(step, lines to print) when the resume checkpoint already reached the run's last step; None when there
    are steps to train. The lines: nothing to do, and what changed in the recipe since the checkpoint."""
    if resume_from is None:
        return None
    saved, total = read_run_state(resume_from), plan_steps(cfg)
    step = int(saved["train"]["step"])
    if step < total:
        return None
    recipe = RecipeFingerprint(cfg, total)
    recipe.load_state_dict(saved.get("recipe") or {})
    lines = [f"nothing to do: {Path(cfg.run.dir)} already finished at step {step} of {total}; raise train.max_steps to "
             "continue it, or give a new run.dir= to start another run", recipe.changes(step)]
    return step, [x for x in lines if x]


class _Trainer:
    """One launch of a run: set up in __init__ (in order), then `run` loops over steps."""

    def __init__(self, cfg: RecipeConfig, prepared: dict, arch, denv, resume_from: Path | None):
        from megatron.core import parallel_state as ps

        from cpt_megatron.tokenizer import load_tokenizer

        self.cfg, self.prepared, self.arch = cfg, prepared, arch
        self.run_dir, self.base = Path(cfg.run.dir), prepared["base"]
        self.rank0, self.world = denv.rank == 0, denv.world_size
        self.dp, self.dp_rank = cfg.parallel.dp(denv.world_size), ps.get_data_parallel_rank()
        self.G, self.micro, self.S = cfg.train.global_batch, cfg.train.micro_batch, cfg.data.seq_len
        self.total_steps = plan_steps(cfg)
        self.tokenizer = load_tokenizer(prepared["tokenizer"])
        check_tokenizer_fits(self.tokenizer, prepared["tokenizer"], int(prepared["vocab_size"]))
        self.groups = {s.name: s.group for s in cfg.data.sources}
        # the run's state: one registry of stateful components, saved once per checkpoint (train/state.py)
        self.run_state = RunState()
        self.state = self.run_state.register("train", TrainState(phases=list(cfg.data.phases)))
        self.recipe = self.run_state.register("recipe", RecipeFingerprint(cfg, self.total_steps))
        self.guard = self.run_state.register("stability", StabilityGuard(cfg.train.max_skipped, cfg.train.spike_factor))
        if resume_from is not None:
            self.run_state.load_state_dict(read_run_state(resume_from))
        self.mixture = self._mixture(self.state.phases)
        self.engine = self._engine()
        self.reg = self._regularizer()
        if self.reg is not None:
            self.run_state.register("regularizer", self.reg)
        self.stages = self._stages()
        # checkpoint.async_save (megatron-core's async queue); step batches read ahead on TP rank 0, broadcast over TP
        from cpt_megatron.train.async_save import AsyncCheckpointSaver
        from cpt_megatron.train.data_loader import StepLoader

        self.saver = AsyncCheckpointSaver() if cfg.checkpoint.async_save else None
        self.loader = StepLoader.for_this_rank(global_batch=self.G, micro=self.micro)
        if resume_from is not None:
            load_checkpoint(resume_from, self.engine)
            self._say(f"resumed from {resume_from} at step {self.state.step} "
                      f"({self.state.consumed_samples} samples consumed)")
            for line in (self.recipe.changes(self.state.step), self.reg.changes() if self.reg else None):
                if line:
                    self._say(line)
        self.resumed = resume_from is not None
        if self.rank0:  # a resumed run logs each step once: records past the checkpoint are redone
            cut_logs(self.run_dir, self.state.step if self.resumed else None)
        self.logger = self._logger()
        self.evaluator = _Evaluator(self.mixture, self.groups, self.tokenizer, cfg.eval.batches, self.micro,
                                    self.dp_rank, self.dp, heldout=cfg.eval.general, seq_len=self.S)
        self.monitor_config = self._monitor_config()
        self.monitor = None
        self._ensure_monitor()  # a resumed run's monitor exists (and gets its saved state) from the start
        self.bench = self._benchmarks()

    # ---- set-up steps -----------------------------------------------------------------------------------
    def _mixture(self, phases):
        ewc = self.cfg.train.ewc
        fisher = ewc.batches * self.micro if ewc.kind == "ewc" else 0
        return recipe_mixture(self.cfg, self.prepared, phases=phases,
                              valid_samples=max(1, self.cfg.eval.batches * self.micro * self.dp, fisher))

    def _engine(self):
        from cpt_megatron.checkpoint import load_model_weights
        from cpt_megatron.model import build_model
        from cpt_megatron.train.engine import Engine

        vocab = int(self.prepared["vocab_size"])
        # GPU: no random init of weights loaded next (CPU keeps it: its RNG use keeps CPU runs as they were)
        opts = dataclasses.replace(self.cfg.model.options, vocab_size=vocab, initialize=not on_gpu())
        chunks = build_model(self.arch, self.cfg.parallel, opts, fp8=self.cfg.train.fp8)
        load_model_weights(chunks, self.base)  # base weights first: also the EWC anchor
        return Engine(chunks, self.cfg.parallel, self.cfg.optim, seq_len=self.S, micro_batch=self.micro)

    def _regularizer(self):
        ewc = self.cfg.train.ewc
        if ewc.kind == "none":
            return None
        from cpt_megatron.train.ewc import Regularizer

        reg = Regularizer(self.engine, ewc.kind, ewc.lam, vocab_size=int(self.prepared["vocab_size"]))
        if ewc.kind == "ewc":  # diagonal Fisher from the first replay validation micro-batches, the same on every rank
            general = next(n for n, g in self.groups.items() if g == "general")
            ds = self.mixture.valid[general]
            mbs = [rank_microbatches(ds, i * self.micro, self.micro, 0, 1, self.micro)[0][0]
                   for i in range(min(ewc.batches, len(ds) // self.micro))]
            reg.estimate_fisher(self.engine, mbs)
        return reg

    def _stages(self):
        """train.stages (train/stages.py): the stage is a function of the step, so it needs no saved state."""
        if not self.cfg.train.stages:
            return None
        from megatron.core import parallel_state as ps

        from cpt_megatron.checkpoint import read_meta
        from cpt_megatron.train.stages import StagedTraining

        return StagedTraining(self.cfg.train.stages, self.total_steps, self.engine, read_meta(self.base),
                              ps.get_tensor_model_parallel_rank(), self.cfg.optim.lr)

    def _logger(self):
        from cpt_megatron.train.metrics import MetricsLogger

        lg = self.cfg.logging
        return MetricsLogger(self.run_dir, self.arch, self.S, self.world, self.rank0, lg.tensorboard, lg.wandb,
                             lg.wandb_mode, to_dict(self.cfg))

    def _benchmarks(self):
        """eval.benchmarks: lm-eval tasks scored in this layout (eval/benchmarks.py); None without any."""
        if not self.cfg.eval.benchmarks:
            return None
        from cpt_megatron.eval.benchmarks import TrainingBenchmarks

        return TrainingBenchmarks(self.cfg.eval.benchmarks, default_interval=self.cfg.eval.interval,
                                  tokenizer=self.tokenizer, max_length=self.arch.max_position_embeddings,
                                  micro_batch=self.micro, quiet=not self.rank0, out_dir=self.run_dir / "benchmarks",
                                  benchmark_data=self.cfg.eval.benchmark_data)

    def _monitor_config(self):
        """The forgetting monitor needs a general evaluation set (eval.general, else replay); without one it is off."""
        from cpt_megatron.eval.monitor import MonitorConfig

        general = "general" in self.groups.values() or bool(self.cfg.eval.general)
        return MonitorConfig(**self.cfg.eval.monitor) if general else None

    def _ensure_monitor(self):
        """The forgetting monitor, once there is a baseline to compare with (registered in the run state)."""
        from cpt_megatron.eval.monitor import ForgettingMonitor

        if self.monitor is None and self.monitor_config is not None and self.state.baseline is not None \
                and self.evaluator.sources:
            self.monitor = self.run_state.register("monitor", ForgettingMonitor(self.monitor_config, self.state.baseline))
        return self.monitor

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self, preempt: PreemptionHandler) -> TrainResult:
        cfg, state = self.cfg, self.state
        self._say_plan()
        losses, first_step = [], state.step
        stopped, exit_code = None, 0
        if state.step == 0 and not self.resumed:
            self.evaluate(0)  # baseline = the base model
        self.launch_steps = 0
        bar = self._progress_bar()
        self.logger.reset_clock()
        while state.step < self.total_steps:
            res, lr = self.step()
            losses.append(res.loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2e}")
            elif self.rank0 and state.step % cfg.train.log_interval == 0:
                stage = f" stage {self.stages.current.index + 1}" if self.stages is not None else ""
                print(f"step {state.step}/{self.total_steps} loss {res.loss:.6f} lr {lr:.3e}{stage}", flush=True)
            stopped = self.guard.observe(state.step, res.loss, res.skipped)
            done = state.step >= self.total_steps
            events = []
            if (cfg.eval.interval and state.step % cfg.eval.interval == 0) or done or \
                    (self.bench is not None and self.bench.due(state.step)):
                events = self.evaluate(state.step)
            rolled_back = any(ev.action == "rollback" for ev in events)
            stopped = self._apply_monitor(events) or stopped
            done = state.step >= self.total_steps
            # after a rollback, re-save its target: the checkpoint then carries the monitor's memory of it
            save_now = done or rolled_back or \
                bool(cfg.checkpoint.save_interval and state.step % cfg.checkpoint.save_interval == 0)
            if cfg.train.exit_interval and self.launch_steps >= cfg.train.exit_interval and not done:
                stopped = stopped or f"exit_interval {cfg.train.exit_interval} reached"
            if preempt.should_stop():
                exit_code = PREEMPT_EXIT_CODE
                stopped = stopped or f"preempted by signal {preempt.signum} after step {state.step}"
            if save_now or stopped:
                self.save()
            if stopped:
                break
        if self.saver is not None:
            with self._async_guard():
                self.saver.close()  # every checkpoint written and renamed before the run returns
        if bar is not None:
            bar.close()
        self.logger.close()
        if stopped:
            self._say(f"stopped: {stopped}")
        return TrainResult(losses, first_step + 1, state.step, str(self.run_dir), exit_code, stopped)

    def step(self):
        """One optimizer step on the next global batch; logs its record. Returns (StepResult, lr)."""
        cfg, state = self.cfg, self.state
        lr = lr_at(state.step, cfg.schedule, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                   total_steps=self.total_steps) * state.lr_scale
        if self.stages is not None:  # this step's stage: frozen parameters/rows, its LR
            if (started := self.stages.begin_step(state.step)) is not None:
                self._say(self.stages.describe(started))
            lr *= self.stages.lr_factor(state.step)
        self.engine.set_lr(lr)
        mbs, samples = self.loader.get(self.mixture.train, state.consumed_samples)  # read ahead on TP rank 0
        res = self.engine.train_step(mbs, grad_hook=self.reg)
        if self.saver is not None:
            with self._async_guard():
                self.saver.poll()
        state.step += 1
        state.consumed_samples += self.G
        self.launch_steps += 1
        rec = {"step": state.step, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
               "skipped": res.skipped, "consumed_samples": state.consumed_samples}
        if self.reg is not None:
            rec["ewc_penalty"] = self.reg.penalty()
        if self.stages is not None:
            rec["stage"] = self.stages.current.index
        mix = {}
        for smp in samples:
            name = self.mixture.source_names[int(smp["source"])]
            mix[name] = mix.get(name, 0) + 1
        rec.update({f"mix/{k}": v / len(samples) for k, v in mix.items()})
        self.logger.step(rec, res.tokens)
        return res, lr

    def evaluate(self, step: int) -> list:
        """Validation losses of every source (logged), then the forgetting monitor's events."""
        res = self.evaluator(self.engine)
        if self.bench is not None:
            res.update(self.bench(step, self.engine.model))
        self.logger.write({"step": step, "results": res}, self.run_dir / "evals.jsonl")
        if self.state.baseline is None:
            self.state.baseline = res
        events = []
        if self._ensure_monitor() is not None:
            events = self.monitor.observe(step, res)
            for ev in events:
                self.logger.write(ev.to_dict(), self.run_dir / "events.jsonl")
        self._say(f"eval step {step}: " + ", ".join(f"{n} ppl {r['ppl']:.3f}" for n, r in res.items() if "ppl" in r))
        if self.bench is not None:
            from cpt_megatron.eval.tasks import format_summary

            bench = {n: r for n, r in res.items() if r.get("benchmark")}
            self._say("\n".join(f"benchmark step {step}: {ln}" for ln in format_summary(bench)))
        for ev in events:
            if ev.kind in ("noise", "warn", "act"):
                self._say(f"monitor: {ev.format()}")
        return events

    def _apply_monitor(self, events) -> str | None:
        """Act on the monitor's events: stop, adapt (more replay from now on) or roll back. Returns a stop reason."""
        stopped = None
        for ev in events:
            params = ev.params or {}
            if ev.action == "stop":
                stopped = f"forgetting monitor stopped the run at step {self.state.step}"
            elif ev.action == "adapt":
                self._adapt(params)
            elif ev.action == "rollback":
                self._rollback(params)
        return stopped

    def _adapt(self, params: dict) -> None:
        from cpt_megatron.data.mixture import with_extra_phase

        state, mixture = self.state, self.mixture
        cur = mixture.phase_alphas[-1] if getattr(mixture, "phase_alphas", None) else self.cfg.data.alpha
        new_alpha = max(0.0, cur + float(params.get("alpha_delta", -0.1)))
        new_cfg = with_extra_phase(mixture.cfg, state.consumed_samples, self.total_steps * self.G, new_alpha)
        state.phases = [dataclasses.asdict(p) for p in new_cfg.phases]
        self.mixture = self._mixture(state.phases)
        if "lr_factor" in params:
            state.lr_scale *= float(params["lr_factor"])

    def _saved_steps(self) -> list[int]:
        from cpt_megatron.checkpoint import layout

        return [int(p.name.split("_")[1]) for p in layout.iteration_folders(self.run_dir / "checkpoints")]

    def _rollback(self, params: dict) -> None:
        """Back to the monitor's target checkpoint k: model, optimizer, RNG and the run state (data position,
        phases, stability) all k's, except the monitor, which remembers the rollback; lr scale x lr_factor.
        Checkpoints past k belong to the abandoned steps and are removed (a requeue must not resume them)."""
        state, factor = self.state, float(params.get("lr_factor", 0.5))
        if self.saver is not None:  # in-flight saves finalized first: they are candidates too
            with self._async_guard():
                self.saver.wait()
        # rank 0 lists the checkpoints and every rank gets its answer (one shared file-system view)
        target = [self.monitor.rollback_target(self._saved_steps()) if self.rank0 and self.monitor else None]
        torch.distributed.broadcast_object_list(target, src=0)
        target = target[0]
        if target is None:
            state.lr_scale *= factor
            self._say(f"monitor: rollback to nothing (no checkpoint below warn), lr scale {state.lr_scale:.3g}")
            return
        best, step = self.run_dir / "checkpoints" / iter_name(target), state.step
        saved = load_checkpoint(best, self.engine)
        self.run_state.load_state_dict(saved, skip=("monitor", "recipe", "regularizer"))
        state.lr_scale *= factor
        self.monitor.note_rollback(step, target)
        self.mixture = self._mixture(state.phases)
        if self.rank0:
            discard_after(self.run_dir, target)
        self._say(f"monitor: rolled back from step {step} to {best.name}, lr scale {state.lr_scale:.3g}")

    def save(self) -> None:
        if self.saver is not None and self.saver.pending:
            # one checkpoint in flight at a time: bounded disk use, checkpoints finalized in order, a failure named
            self._say(f"checkpoint: the previous async save is still being written; waiting for it before saving step "
                      f"{self.state.step} (a longer checkpoint.save_interval avoids the wait)")
            with self._async_guard():
                self.saver.wait()
        with save_guard(self.run_dir, self.rank0):  # a failed save leaves no partial folder, one clear line
            save_checkpoint(self.run_dir, self.state.step, self.engine, self.run_state.state_dict(), self.base,
                            saver=self.saver)
        if self.rank0:  # the monitor's current rollback target is kept whatever keep_last says
            target = self.monitor.rollback_target(self._saved_steps()) if self.monitor is not None else None
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.milestones,
                              protect=[target] if target is not None else [])
        self.logger.reset_clock()

    def _async_guard(self):
        """An async save's background write fails at the saver's poll/wait/close: same one line, no partial folder."""
        return save_guard(self.run_dir, self.rank0, clean_first=False)

    # ---- output -----------------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.rank0:
            print(msg, flush=True)

    def _say_plan(self) -> None:
        a, p, tps = self.arch, self.cfg.parallel, self.G * self.S
        self._say(f"cpt train: {a.model_type} {a.num_layers}L h{a.hidden_size} | tp {p.tp} pp {p.pp} dp {self.dp} | "
                  f"global batch {self.G} x seq {self.S} ({tps:,} tokens/step), {self.G // (self.micro * self.dp)} micro-batches "
                  f"of {self.micro} per rank | {self.total_steps} steps, {self.total_steps * tps:,} tokens | run "
                  f"{self.run_dir}")

    def _progress_bar(self):
        if not (self.rank0 and self.cfg.logging.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)


def _write_config(run_dir: Path, cfg: RecipeConfig, overrides) -> None:
    import yaml

    from cpt_megatron.utils import atomic_file

    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_dir / "config.yaml") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    if overrides:
        with open(run_dir / "overrides.txt", "a") as f:
            f.write(" ".join(overrides) + "\n")
