"""`eval.benchmarks` during training: lm-eval tasks on the training model in its own layout, no copy.

The driver builds `TrainingBenchmarks` once (tasks and datasets are resolved then, offline, so a missing
dataset fails before the first step), asks `due(step)` and merges `__call__(step, model)` into the
evaluation's results: {task: {"group": general|domain, "benchmark": True, "watch": metric, "acc": ..,
"acc_stderr": .., ..., "n": docs, "higher_is_better": {...}}}. Those land in evals.jsonl beside
perplexity, and the forgetting monitor watches the general ones with their standard error.
Collective: every rank calls with the same step.
"""

from __future__ import annotations

from cpt_megatron.errors import CptError
from cpt_megatron.eval.tasks import BenchmarkConfig, require_lm_eval, resolve_tasks

__all__ = ["TrainingBenchmarks"]


class TrainingBenchmarks:
    def __init__(self, benchmarks: list[BenchmarkConfig], *, default_interval: int | None, tokenizer,
                 max_length: int, micro_batch: int, quiet: bool = False, out_dir=None, benchmark_data=None):
        self.out_dir = out_dir  # lm-eval's results JSON per evaluation: OUT/step_<N>.<task>.json (rank 0: not quiet)
        self.cfgs = list(benchmarks)
        self.default_interval = default_interval
        self.benchmark_data = benchmark_data  # eval.benchmark_data: DIR/<task>/<split>.jsonl (eval/tasks.py)
        self.tokenizer, self.max_length, self.micro_batch, self.quiet = tokenizer, max_length, micro_batch, quiet
        require_lm_eval()
        for b in self.cfgs:
            resolve_tasks([b.task])  # a bad path fails at setup
            if b.interval is None and default_interval is None:
                raise CptError(f"eval.benchmarks[{b.task}]: no interval (set eval.benchmarks[].interval or eval.interval)")

    def due(self, step: int) -> list[BenchmarkConfig]:
        return [b for b in self.cfgs if step == 0 or step % (b.interval or self.default_interval) == 0]

    def __call__(self, step: int, model: list) -> dict:
        """Scores of the benchmarks due at `step` (empty when none is)."""
        from cpt_megatron.eval.harness import LayoutScorer, MegatronLM
        from cpt_megatron.eval.tasks import run_tasks

        due = self.due(step)
        if not due:
            return {}
        scorer = LayoutScorer(model, micro_batch=self.micro_batch, pad_id=int(self.tokenizer.eos_token_id))
        out = {}
        for b in due:
            lm = MegatronLM(scorer, self.tokenizer, max_length=self.max_length, batch_size=b.batch_size, quiet=self.quiet)
            res = run_tasks(lm, [b.task], limit=b.limit, num_fewshot=b.num_fewshot, batch_size=b.batch_size,
                            quiet=self.quiet, benchmark_data=self.benchmark_data)
            summary = res["summary"]
            if self.out_dir is not None and not self.quiet:
                self._write(res["lm_eval"], step, "+".join(summary))
            for name, row in summary.items():
                if b.metric not in row:
                    raise CptError(f"eval.benchmarks[{b.task}].metric={b.metric!r}: task {name} reports "
                                   f"{sorted(k for k in row if k not in ('n', 'higher_is_better'))}")
                out[name] = {"group": "general" if b.general else "domain", "benchmark": True, "watch": b.metric, **row}
        return out

    def _write(self, lm_eval_res: dict, step: int, name: str) -> None:
        import json
        from pathlib import Path

        from lm_eval.utils import handle_non_serializable

        from cpt_megatron.utils import atomic_file

        with atomic_file(Path(self.out_dir) / f"step_{step:07d}.{name}.json") as f:
            json.dump(lm_eval_res, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
