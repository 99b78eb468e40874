"""Benchmarks through lm-evaluation-harness, offline by design: task resolution, one run, the summary.

Tasks are lm-eval registry names (`hellaswag`, `arc_easy`, `mmlu`, ...) whose datasets must already be
in the user's local `datasets` cache, or the path of a task YAML file / a folder of them (lm-eval's
include path; e.g. `dataset_path: json` with local `data_files`). Hub access is switched off around
every run (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): a dataset that is not local is one clear error naming
the task and both ways to provide it, never a download that hangs on a compute node.

Summary (`summarize`): {task: {"acc": .., "acc_stderr": .., "acc_norm": .., ..., "n": docs,
"higher_is_better": {metric: bool}}} under lm-eval's metric names (a filter other than "none" is kept
as `metric,filter`). For a mean of 0/1 scores lm-eval's stderr is the binomial one, sqrt(p(1-p)/(n-1)).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from cpt_megatron.config import BenchmarkConfig
from cpt_megatron.errors import CptError

__all__ = ["BenchmarkConfig", "require_lm_eval", "offline", "resolve_tasks", "run_tasks", "summarize", "format_summary"]

_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
HOWTO = ("provide it offline: either load it once on a machine with network (python -c \"import datasets; "
         "datasets.load_dataset(PATH, NAME)\") and copy the datasets cache (HF_DATASETS_CACHE, default "
         "~/.cache/huggingface/datasets) here, or give a task YAML with `dataset_path: json` and local "
         "`dataset_kwargs: {data_files: ...}` (docs/monitor.md)")


def require_lm_eval() -> None:
    """lm-evaluation-harness is the `eval` extra: one clear line when it is missing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise CptError("benchmarks need lm-evaluation-harness: pip install 'cpt-megatron[eval]' (or pip install lm-eval)")


@contextlib.contextmanager
def offline():
    """Hub access off for datasets / huggingface_hub / transformers, restored afterwards."""
    import sys

    saved = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    patched = []  # the libraries read these once at import: patch the loaded constants too
    for mod, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                       ("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))):
        m = sys.modules.get(mod)
        for a in attrs if m is not None else ():
            if hasattr(m, a):
                patched.append((m, a, getattr(m, a)))
                setattr(m, a, True)
    try:
        yield
    finally:
        for m, a, v in patched:
            setattr(m, a, v)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _local_rank_zero(active: bool):
    saved = os.environ.get("LOCAL_RANK")
    if active and saved is not None:
        os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved


def _yaml_task_names(path: Path) -> list[str]:
    """The `task:` names declared by a task YAML (lm-eval YAMLs carry !function tags: read the key only)."""
    names = re.findall(r"^task:\s*['\"]?([^'\"\n#]+?)['\"]?\s*(?:#.*)?$", path.read_text(encoding="utf-8"), re.M)
    groups = re.findall(r"^group:\s*['\"]?([^'\"\n#]+?)['\"]?\s*(?:#.*)?$", path.read_text(encoding="utf-8"), re.M)
    return groups or names


def resolve_tasks(specs: list[str]) -> tuple[list[str], list[str], bool]:
    """Task specs -> (task names, include paths, whether lm-eval's registry is needed).

    A spec is a registry name, a task YAML file (its `task:`/`group:` name, its folder included) or a folder
    (every YAML in it that declares a task). A path-looking spec that does not exist is an error.
    """
    names, include, registry = [], [], False
    for spec in specs:
        p = Path(spec)
        looks_like_path = p.suffix in (".yaml", ".yml") or os.sep in spec or p.is_dir()
        if not looks_like_path:
            names.append(spec)
            registry = True
            continue
        if not p.exists():
            raise CptError(f"task {spec}: no such file or folder (give an lm-eval task name, a task YAML or a folder of them)")
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*.y*ml"))
        found = [n for f in files for n in _yaml_task_names(f)]
        if not found:
            raise CptError(f"task {spec}: no `task:` or `group:` declared in {'it' if p.is_file() else 'its YAML files'}")
        for f in files:
            if re.search(r"^include:", f.read_text(encoding="utf-8"), re.M):
                registry = True  # it may include a registry YAML by name
        include.append(str((p.parent if p.is_file() else p).resolve()))
        names.extend(found)
    if not names:
        raise CptError("no tasks given (e.g. --tasks hellaswag,arc_easy,mmlu or a task YAML)")
    return names, sorted(set(include)), registry


def _task_manager(include: list[str], registry: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include or None, include_defaults=registry)


def _check_task(name: str, tm) -> None:
    """Load the task (and its dataset) once, offline; a missing task or dataset is one clear line."""
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict([name], tm)
    except (ConnectionError, FileNotFoundError, OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KeyError) or "not found" in msg.lower() and "task" in msg.lower():
            raise CptError(f"task {name!r} is not an lm-eval task or group, nor declared by the given YAMLs ({msg})") from e
        raise CptError(f"task {name!r}: its dataset is not available offline ({msg}); {HOWTO}") from e
    except Exception as e:  # datasets' DatasetNotFoundError and friends
        if type(e).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError", "HfHubHTTPError"):
            raise CptError(f"task {name!r}: its dataset is not available offline ({str(e).splitlines()[0]}); {HOWTO}") from e
        raise


def run_tasks(lm, specs: list[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
              batch_size: int = 16, model_args: str | None = None, log_samples: bool = False, seed: int = 1234,
              bootstrap_iters: int = 1000, quiet: bool = False) -> dict:
    """Run lm-eval's simple_evaluate offline; returns {"lm_eval": its results dict, "summary": summarize(..)}.

    `lm` is an lm-eval LM instance (MegatronLM) or a registry model name ("hf") with `model_args`.
    Collective when the LM is (MegatronLM): call on every rank with the same arguments.
    """
    import logging

    names, include, registry = resolve_tasks(specs)
    require_lm_eval()
    with offline():
        import lm_eval

        if quiet:
            for lg in ("lm-eval", "lm_eval", "datasets", "transformers"):
                logging.getLogger(lg).setLevel(logging.ERROR)
        tm = _task_manager(include, registry)
        for n in names:
            _check_task(n, tm)
        kwargs = dict(model_args=model_args, device=None) if isinstance(lm, str) else {}
        with _local_rank_zero(not isinstance(lm, str)):  # lm-eval returns results only where LOCAL_RANK is 0: we want them on every rank
            res = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, task_manager=tm,
                log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed, **kwargs)
    if res is None:
        raise RuntimeError("lm-eval returned no results on this rank")
    return {"lm_eval": res, "summary": summarize(res, names)}


def summarize(res: dict, names: list[str]) -> dict:
    """{task: {metric: value, metric_stderr: value, "n": docs, "higher_is_better": {...}}} for the asked tasks."""
    out = {}
    results, hib = res.get("results", {}), res.get("higher_is_better", {})
    n_samples, subtasks = res.get("n-samples", {}), res.get("group_subtasks", {})
    for name in names:
        r = res.get("groups", {}).get(name) or results.get(name)
        if r is None:
            continue
        row = {}
        for key, v in r.items():
            if "," not in key or not isinstance(v, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else key] = None if v == "N/A" else float(v)
        leaves = _leaves(name, subtasks)
        row["n"] = int(sum(n_samples.get(t, {}).get("effective", 0) for t in leaves))
        row["higher_is_better"] = {m: bool(b) for m, b in hib.get(name, {}).items()}
        out[name] = row
    return out


def _leaves(name: str, subtasks: dict) -> list[str]:
    if name not in subtasks:
        return [name]
    return [leaf for s in subtasks[name] for leaf in _leaves(s, subtasks)]


def format_summary(summary: dict) -> list[str]:
    """One line per task: `arc_easy  acc 0.4520 ± 0.0157  acc_norm 0.4010 ± 0.0155  n 1000`."""
    lines = []
    for name, row in summary.items():
        parts = [f"{name:<24}"]
        for m, v in row.items():
            if m in ("n", "higher_is_better", "group", "benchmark", "watch") or m.endswith("_stderr") or "_stderr," in m:
                continue
            se = row.get(f"{m}_stderr") if "," not in m else row.get(m.replace(",", "_stderr,", 1))
            parts.append(f"{m} {v:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
        parts.append(f"n {row.get('n')}")
        lines.append("  ".join(parts))
    return lines
