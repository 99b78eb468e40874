"""`cpt train`: continued pretraining on megatron-core. Reads top to bottom:

setup (dist, prepare base + data, model, optimizer, resume) -> loop (lr, batch, step, log, eval+monitor,
save, preemption) -> final save and evaluation.

Data order: step k uses global samples [k*G, (k+1)*G) of the mixture (G = global batch); DP rank r takes
the r-th contiguous slice. The sequence therefore depends only on the step, not on the layout, so a run
resumed with another DP size continues the same samples, and every layout sees the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from cpt_megatron.config import RecipeConfig, to_dict
from cpt_megatron.errors import CptError
from cpt_megatron.runtime import destroy_distributed, init_distributed
from cpt_megatron.train.schedule import lr_at
from cpt_megatron.train.signals import PREEMPT_EXIT_CODE, PreemptionHandler

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


def plan_steps(cfg: RecipeConfig) -> int:
    if cfg.train.max_steps is not None:
        return int(cfg.train.max_steps)
    return max(1, math.ceil(cfg.train.tokens / (cfg.train.global_batch * cfg.data.seq_len)))


def _collate(samples: list[dict]) -> dict:
    out = {}
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        if k in samples[0]:
            out[k] = torch.stack([torch.as_tensor(s[k]) for s in samples])
    return out


def _microbatches(dataset, start: int, count: int, dp_rank: int, dp: int, micro: int) -> tuple[list[dict], list]:
    per = count // dp
    idx = range(start + dp_rank * per, start + (dp_rank + 1) * per)
    samples = [dataset[i] for i in idx]
    return [_collate(samples[i:i + micro]) for i in range(0, per, micro)], samples


class _Evaluator:
    """Fixed validation micro-batches per source, evaluated in the training layout (forward-only schedules)
    through cpt_megatron.eval (one definition of loss/ppl/bits-per-byte)."""

    def __init__(self, mixture, groups: dict, tokenizer, n_batches: int, micro: int, dp_rank: int, dp: int):
        from cpt_megatron.eval.perplexity import batches_from_dataset

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

    def __call__(self, engine) -> dict:
        from cpt_megatron.eval.perplexity import evaluate_sources

        return evaluate_sources(engine.eval_step, self.sources)


def _monitor(cfg: RecipeConfig, groups: dict):
    """Monitor factory (needs a general validation source; without one, only a warning is printed)."""
    from cpt_megatron.eval.monitor import ForgettingMonitor, MonitorConfig

    mcfg = MonitorConfig(**cfg.eval.monitor)  # validated up front: a bad key fails before training
    if "general" not in groups.values():
        return None
    return lambda baseline: ForgettingMonitor(mcfg, baseline)


def train(cfg: RecipeConfig, overrides: list[str] | None = None) -> TrainResult:
    from megatron.core import parallel_state as ps

    from cpt_megatron.checkpoint import arch_from_ckpt, load_model_weights, read_meta
    from cpt_megatron.data.mixture import MixtureConfig, SourceConfig, build_mixture, check_dataset_tokenizer
    from cpt_megatron.model import build_model
    from cpt_megatron.runtime import dist_env
    from cpt_megatron.tokenizer import load_tokenizer
    from cpt_megatron.train.checkpointing import (
        iter_name,
        load_checkpoint,
        prune_checkpoints,
        save_checkpoint,
        select_resume,
    )
    from cpt_megatron.train.engine import Engine
    from cpt_megatron.train.metrics import MetricsLogger

    run_dir = Path(cfg.run.dir)
    # Preparation (base import with its own parity check, curation, tokenization) runs on global rank 0
    # BEFORE the process groups exist: the importer sets up and tears down its own 1-rank group.
    prepared = _prepare_once(cfg, dist_env().rank, overrides)
    denv = init_distributed(cfg.parallel, seed=cfg.run.seed)
    rank0 = denv.rank == 0
    preempt = PreemptionHandler()
    try:
        # ---- setup --------------------------------------------------------------------------------------
        resume_from, skipped = select_resume(run_dir, cfg.resume)  # newest complete + verified checkpoint
        for line in skipped if rank0 else ():
            print(f"resume: skipped {line}", flush=True)
        base, tok_spec = prepared["base"], prepared["tokenizer"]
        arch, meta = arch_from_ckpt(base, tok_spec), read_meta(base, tok_spec)  # tok_spec: a Megatron-LM base
        arch.check_seq_len(cfg.data.seq_len)
        tokenizer = load_tokenizer(tok_spec)
        true_vocab = int(meta.get("vocab_size") or arch.vocab_size)
        if len(tokenizer) > true_vocab:
            raise CptError(f"tokenizer {tok_spec} has {len(tokenizer)} tokens but the model has {true_vocab} rows; "
                           "run `cpt resize-embeddings` first")
        dp = cfg.parallel.dp(denv.world_size)
        G, micro, S = cfg.train.global_batch, cfg.train.micro_batch, cfg.data.seq_len
        if G % (micro * dp):
            raise CptError(f"train.global_batch={G} is not divisible by train.micro_batch*dp = {micro}*{dp}; "
                           f"use a multiple of {micro * dp}")
        total_steps = plan_steps(cfg)
        train_samples = total_steps * G
        for s in prepared["sources"]:
            check_dataset_tokenizer(s["prefix"], true_vocab)

        state = {"step": 0, "consumed_samples": 0, "phases": list(cfg.data.phases), "lr_scale": 1.0,
                 "baseline": None, "best": None}
        if resume_from is not None:
            from megatron.core import dist_checkpointing

            saved = dist_checkpointing.load_common_state_dict(str(resume_from))["train_state"]
            state.update({k: saved[k] for k in state if k in saved})

        def make_mixture(phases):
            mcfg = MixtureConfig(
                sources=[SourceConfig(name=s["name"], prefix=s["prefix"], group=s["group"], weight=s["weight"],
                                      tokens=s["tokens"]) for s in prepared["sources"]],
                alpha=cfg.data.alpha, phases=phases, valid_fraction=cfg.data.valid_fraction, seed=cfg.data.seed,
                max_epochs_warn=cfg.data.max_epochs_warn)
            return build_mixture(mcfg, seq_len=S, train_samples=train_samples,
                                 valid_samples=max(1, cfg.eval.batches * micro * dp),
                                 cache_dir=str(Path(cfg.data.cache_dir) / "indices"), tokenizer_vocab_size=true_vocab,
                                 eod_id=int(tokenizer.eos_token_id))

        mixture = make_mixture(state["phases"])
        groups = {s["name"]: s["group"] for s in prepared["sources"]}

        chunks = build_model(arch, cfg.parallel, dataclasses.replace(cfg.model.options, vocab_size=true_vocab))
        load_model_weights(chunks, base)  # base weights first: also the EWC anchor
        engine = Engine(chunks, cfg.parallel, cfg.optim, seq_len=S, micro_batch=micro)
        reg = None
        if cfg.train.ewc.kind != "none":
            from cpt_megatron.train.ewc import Regularizer

            reg = Regularizer(engine, cfg.train.ewc.kind, cfg.train.ewc.lam)
            if cfg.train.ewc.kind == "ewc":
                general = [n for n, g in groups.items() if g == "general"]
                if not general:
                    raise CptError("train.ewc.kind=ewc needs a general (replay) source for the Fisher estimate")
                ds = mixture.valid[general[0]]
                n = cfg.train.ewc.batches * micro * dp
                batches = [_microbatches(ds, i * micro * dp, micro * dp, ps.get_data_parallel_rank(), dp, micro)[0]
                           for i in range(min(cfg.train.ewc.batches, len(ds) // (micro * dp)))]
                del n
                reg.estimate_fisher(engine, batches)
        if resume_from is not None:
            load_checkpoint(resume_from, engine)
            if rank0:
                print(f"resumed from {resume_from} at step {state['step']} "
                      f"({state['consumed_samples']} samples consumed)", flush=True)

        logger = MetricsLogger(run_dir, arch, S, denv.world_size, rank0, cfg.logging.tensorboard, cfg.logging.wandb,
                               cfg.logging.wandb_mode, to_dict(cfg))
        evaluator = _Evaluator(mixture, groups, tokenizer, cfg.eval.batches, micro, ps.get_data_parallel_rank(), dp)
        monitor_factory = _monitor(cfg, groups)
        monitor = None

        def evaluate(step):
            nonlocal monitor
            res = evaluator(engine)
            logger.write({"step": step, "results": res}, run_dir / "evals.jsonl")
            if state["baseline"] is None:
                state["baseline"] = res
            events = []
            if monitor_factory is not None and evaluator.sources:
                monitor = monitor or monitor_factory(state["baseline"])
                events = monitor.observe(step, res)
                for ev in events:
                    logger.write(ev.to_dict(), run_dir / "events.jsonl")
            if rank0:
                dom = [f"{n} ppl {r['ppl']:.3f}" for n, r in res.items()]
                print(f"eval step {step}: " + ", ".join(dom), flush=True)
                for ev in events:
                    if ev.kind in ("warn", "act"):
                        print(f"monitor: {ev.format()}", flush=True)
            return events

        if rank0:
            tokens_per_step = G * S
            print(f"cpt train: {arch.model_type} {arch.num_layers}L h{arch.hidden_size} | tp {cfg.parallel.tp} "
                  f"pp {cfg.parallel.pp} dp {dp} | global batch {G} seq ({tokens_per_step:,} tokens/step), "
                  f"{G // (micro * dp)} micro-batches of {micro} per rank | {total_steps} steps, "
                  f"{total_steps * tokens_per_step:,} tokens | run {run_dir}", flush=True)

        # ---- loop ---------------------------------------------------------------------------------------
        losses, first_step = [], state["step"]
        stopped, exit_code = None, 0
        if state["step"] == 0 and resume_from is None:
            evaluate(0)  # baseline = the base model
        launch_steps, skipped_run, running = 0, 0, None
        bar = None
        if rank0 and cfg.logging.progress:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
        logger.reset_clock()
        while state["step"] < total_steps:
            step = state["step"]
            lr = lr_at(step, cfg.schedule, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, total_steps=total_steps)
            lr *= state["lr_scale"]
            engine.set_lr(lr)
            mbs, samples = _microbatches(mixture.train, state["consumed_samples"], G, ps.get_data_parallel_rank(),
                                         dp, micro)
            res = engine.train_step(mbs, grad_hook=reg)
            state["step"] += 1
            state["consumed_samples"] += G
            launch_steps += 1
            losses.append(res.loss)
            skipped_run = skipped_run + 1 if res.skipped else 0
            rec = {"step": state["step"], "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                   "skipped": res.skipped, "consumed_samples": state["consumed_samples"]}
            if reg is not None:
                rec["ewc_penalty"] = reg.penalty()
            mix = {}
            for smp in samples:
                name = mixture.source_names[int(smp["source"])]
                mix[name] = mix.get(name, 0) + 1
            rec.update({f"mix/{k}": v / len(samples) for k, v in mix.items()})
            logger.step(rec, res.tokens)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2e}")
            elif rank0 and state["step"] % cfg.train.log_interval == 0:
                print(f"step {state['step']}/{total_steps} loss {res.loss:.6f} lr {lr:.3e}", flush=True)
            # stability
            if skipped_run >= cfg.train.max_skipped:
                stopped = f"{skipped_run} consecutive non-finite gradient steps (last at step {state['step']})"
            if math.isfinite(res.loss):
                if running is not None and cfg.train.spike_factor > 0 and res.loss > cfg.train.spike_factor * running:
                    stopped = f"loss spike at step {state['step']}: {res.loss:.4f} > {cfg.train.spike_factor} x mean {running:.4f}"
                running = res.loss if running is None else 0.9 * running + 0.1 * res.loss
            # evaluation + forgetting monitor
            done = state["step"] >= total_steps
            events = []
            if (cfg.eval.interval and state["step"] % cfg.eval.interval == 0) or done:
                events = evaluate(state["step"])
            save_now = done or bool(cfg.checkpoint.save_interval and state["step"] % cfg.checkpoint.save_interval == 0)
            for ev in events:
                action, params = ev.action, ev.params or {}
                if action == "stop":
                    stopped = f"forgetting monitor stopped the run at step {state['step']}"
                elif action == "adapt":
                    from cpt_megatron.data.mixture import with_extra_phase

                    cur = mixture.phase_alphas[-1] if getattr(mixture, "phase_alphas", None) else cfg.data.alpha
                    new_alpha = max(0.0, cur + float(params.get("alpha_delta", -0.1)))
                    new_cfg = with_extra_phase(mixture.cfg, state["consumed_samples"], train_samples, new_alpha)
                    state["phases"] = [dataclasses.asdict(p) for p in new_cfg.phases]
                    mixture = make_mixture(state["phases"])
                    if "lr_factor" in params:
                        state["lr_scale"] *= float(params["lr_factor"])
                elif action == "rollback":
                    state["lr_scale"] *= float(params.get("lr_factor", 0.5))
                    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("iter_*"))
                    target = monitor.rollback_target(saved) if monitor is not None else None
                    best = (run_dir / "checkpoints" / iter_name(target)) if target is not None else None
                    if rank0:
                        print(f"monitor: rollback to {best.name if best else 'nothing (no checkpoint below warn)'}"
                              f", lr scale {state['lr_scale']:.3g}", flush=True)
                    if best is not None:
                        keep = dict(state)
                        load_checkpoint(best, engine)
                        saved = json.loads((best / "train_state.json").read_text())
                        state.update(step=saved["step"], consumed_samples=saved["consumed_samples"],
                                     lr_scale=keep["lr_scale"], baseline=keep["baseline"])
            if stopped:
                save_now = True
            if cfg.train.exit_interval and launch_steps >= cfg.train.exit_interval and not done:
                save_now, stopped = True, stopped or f"exit_interval {cfg.train.exit_interval} reached"
            if preempt.should_stop():
                save_now, exit_code = True, PREEMPT_EXIT_CODE
                stopped = stopped or f"preempted by signal {preempt.signum} after step {state['step']}"
            if save_now:
                save_checkpoint(run_dir, state["step"], engine, _common(state, cfg), base)
                if rank0:
                    prune_checkpoints(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.milestones)
                logger.reset_clock()
            if stopped:
                break
        if bar is not None:
            bar.close()
        logger.close()
        if rank0 and stopped:
            print(f"stopped: {stopped}", flush=True)
        return TrainResult(losses, first_step + 1, state["step"], str(run_dir), exit_code, stopped)
    finally:
        destroy_distributed()


def _prepare_once(cfg: RecipeConfig, rank: int, overrides) -> dict:
    """Rank 0 prepares and writes RUN/prepared.json tagged with the config hash; other ranks wait for it."""
    import hashlib

    run_dir = Path(cfg.run.dir)
    tag = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()
    marker = run_dir / "prepared.json"
    if rank == 0:
        from cpt_megatron.train.prepare import prepare_base, prepare_sources, resolve_tokenizer
        from cpt_megatron.utils import write_json

        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            marker.unlink()
        except FileNotFoundError:
            pass
        from cpt_megatron.runtime.distributed import single_process_env

        with single_process_env():  # the importer's parity check runs its own 1-rank group
            base = prepare_base(cfg.model, cfg.data.cache_dir, cfg.run.seed)
            tok = resolve_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else str(Path(base) / "tokenizer")
            prepared = {"tag": tag, "base": base, "tokenizer": tok, "sources": prepare_sources(cfg.data, tok)}
        _write_config(run_dir, cfg, overrides)
        write_json(marker, prepared)
        return prepared
    deadline = time.time() + 3600
    while time.time() < deadline:
        try:
            prepared = json.loads(marker.read_text())
            if prepared.get("tag") == tag:
                return prepared
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise CptError(f"rank {rank}: rank 0 did not finish preparing data/model within an hour ({marker})")


def _common(state: dict, cfg: RecipeConfig) -> dict:
    return {"step": state["step"], "consumed_samples": state["consumed_samples"], "phases": state["phases"],
            "lr_scale": state["lr_scale"], "baseline": state["baseline"], "best": state["best"],
            "train": {"tokens_per_step": cfg.train.global_batch * cfg.data.seq_len}}


def _write_config(run_dir: Path, cfg: RecipeConfig, overrides) -> None:
    import yaml

    from cpt_megatron.utils import atomic_file

    with atomic_file(run_dir / "config.yaml") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    if overrides:
        with open(run_dir / "overrides.txt", "a") as f:
            f.write(" ".join(overrides) + "\n")
