"""Benchmarks through lm-evaluation-harness, offline by design: task resolution, one run, the summary.

Tasks are lm-eval registry names (`hellaswag`, `arc_easy`, `mmlu`, ...) whose datasets must already be
in the user's local `datasets` cache, or the path of a task YAML file / a folder of them (lm-eval's
include path; e.g. `dataset_path: json` with local `data_files`). Hub access is switched off around
every run (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): a dataset that is not local is one clear error naming
the task and both ways to provide it, never a download that hangs on a compute node.

Local benchmark data (`benchmark_data=DIR`, `cpt eval --benchmark-data DIR`, `eval.benchmark_data`): every
leaf task lm-eval builds (a registry name, a group such as `mmlu`, or a YAML) keeps lm-eval's own config
(prompts, metrics, filters, process_docs) with only its data source rewritten to the `json` builder over
DIR/<task>/<split>.jsonl (or DIR/<dataset>/<config>/, e.g. DIR/mmlu/anatomy/), in the Hub dataset's columns.
The evaluated split is lm-eval's (test_split, else validation_split) when its file is there, else the next
one present (test, then validation); it is reported as "split" in the summary (docs/benchmarks.md).

Summary (`summarize`): {task: {"acc": .., "acc_stderr": .., "acc_norm": .., ..., "n": docs,
"higher_is_better": {metric: bool}}} under lm-eval's metric names (a filter other than "none" is kept
as `metric,filter`). For a mean of 0/1 scores lm-eval's stderr is the binomial one, sqrt(p(1-p)/(n-1)).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import types
from pathlib import Path

from cpt_megatron.config import BenchmarkConfig
from cpt_megatron.errors import CptError

__all__ = ["BenchmarkConfig", "require_lm_eval", "offline", "resolve_tasks", "run_tasks", "summarize", "format_summary",
           "local_task_config", "check_benchmark_data"]

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


EVAL_SPLITS = ("test", "validation")
"""The splits lm-eval evaluates, in its order (ConfigurableTask.eval_docs: test_split, else validation_split)."""


def _task_folder(cfg: dict, root: Path) -> Path:
    """DIR/<task>/, else DIR/<dataset>/<config>/ (DIR/mmlu/anatomy/ for every mmlu variant), else DIR/<dataset>/."""
    name, dataset, config = cfg["task"], str(cfg.get("dataset_path") or ""), cfg.get("dataset_name")
    base = dataset.rstrip("/").rsplit("/", 1)[-1]
    tried = [root / name] + ([root / base / str(config)] if base and config else []) + \
        ([root / base] if base and not config else [])
    for d in tried:
        if d.is_dir():
            return d
    raise CptError(f"benchmark data {root}: no folder for task {name} (looked for "
                   f"{', '.join(str(d) + '/' for d in tried)}); expected DIR/<task>/<split>.jsonl (docs/benchmarks.md)")


def local_task_config(cfg: dict, root: str | os.PathLike) -> tuple[dict, str]:
    """lm-eval's config of one leaf task with its data read from `root` (the json builder over local JSONL);
    returns (config, the evaluated split). Prompts, metrics, filters and process_docs are lm-eval's own."""
    root, name = Path(root), cfg["task"]
    if "class" in cfg or callable(cfg.get("custom_dataset")):
        raise CptError(f"task {name}: a Python-defined lm-eval task; local benchmark data applies to YAML tasks only")
    folder = _task_folder(cfg, root)
    present = {p.name[:-len(".jsonl")]: p for p in folder.glob("*.jsonl")}
    test, val = cfg.get("test_split"), cfg.get("validation_split")
    wanted = [test, val, *EVAL_SPLITS]
    split = next((s for s in wanted if s and s in present), None)
    if split is None:
        want = test or val or "test"
        raise CptError(f"benchmark data {folder}: no {want}.jsonl for task {name} (lm-eval evaluates its "
                       f"{want} split; found {sorted(present) or 'no .jsonl'}); add one of "
                       f"{'/'.join(dict.fromkeys(s for s in wanted if s))}.jsonl")

    def keep(s):  # another split the task reads (few-shot pool, training docs) when its file is here
        return s if s and s in present else None

    # the split keeps lm-eval's role (test, else validation), so lm-eval's few-shot rules apply unchanged
    roles = {"test_split": split, "validation_split": keep(val)} if split == test else \
        {"test_split": None, "validation_split": split}
    fewshot = dict(cfg.get("fewshot_config") or {})
    if "split" in fewshot:
        fewshot["split"] = keep(fewshot["split"])
    out = {**cfg, "dataset_path": "json", "dataset_name": None, **roles,
           "training_split": keep(cfg.get("training_split")), "fewshot_split": keep(cfg.get("fewshot_split"))}
    if cfg.get("fewshot_config") is not None:
        out["fewshot_config"] = fewshot
    used = {s for s in (*roles.values(), out["training_split"], out["fewshot_split"], fewshot.get("split")) if s}
    out["dataset_kwargs"] = {"data_files": {s: str(present[s]) for s in sorted(used)}}
    return out, split


def _local_factory(root: Path, plan_only: bool):
    """lm-eval's TaskFactory building every leaf task over local data (`plan_only`: record, load nothing)."""
    from lm_eval.tasks._factory import TaskFactory

    class LocalDataFactory(TaskFactory):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.splits: dict[str, str] = {}
            self.problems: list[tuple[str, str]] = []  # plan_only: (task, problem) of every leaf task

        def _load_full_config(self, entry, overrides=None):
            from lm_eval.tasks._index import Kind

            cfg = super()._load_full_config(entry, overrides)
            if entry.kind not in (Kind.TASK, Kind.PY_TASK) or not isinstance(cfg.get("task"), str):
                return cfg
            try:
                cfg, self.splits[cfg["task"]] = local_task_config(cfg, root)
            except CptError as e:
                if not plan_only:
                    raise
                self.problems.append((cfg["task"], str(e)))
            return cfg

        def _build_task(self, entry, overrides):
            if not plan_only:
                return super()._build_task(entry, overrides)
            cfg = self._load_full_config(entry, overrides)
            return types.SimpleNamespace(task_name=cfg["task"])

    return LocalDataFactory


@functools.lru_cache(maxsize=2)
def _indexed_task_manager(registry: bool):
    """lm-eval's TaskManager over its own tasks; building the index scans every task YAML (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=registry)


def _task_manager(include: list[str], registry: bool, benchmark_data: str | os.PathLike | None = None,
                  plan_only: bool = False):
    import copy

    from lm_eval.tasks import TaskManager

    # lm-eval's own registry is indexed once per process (each copy gets its own factory); user YAML folders
    # are indexed on every call (they may change between calls)
    tm = TaskManager(include_path=include, include_defaults=registry) if include else \
        copy.copy(_indexed_task_manager(registry))
    if benchmark_data is not None:
        tm._factory = _local_factory(Path(benchmark_data), plan_only)(meta=tm.metadata)
    return tm


def _benchmark_root(benchmark_data: str | os.PathLike) -> Path:
    root = Path(benchmark_data)
    if not root.is_dir():
        raise CptError(f"benchmark data {root}: no such folder (expected DIR/<task>/<split>.jsonl, docs/benchmarks.md)")
    return root


def check_benchmark_data(specs: list[str], benchmark_data: str | os.PathLike) -> dict[str, str]:
    """Every leaf task of `specs` has its local files (nothing loaded): {task: evaluated split}, or one line."""
    root = _benchmark_root(benchmark_data)
    names, include, registry = resolve_tasks(specs)
    require_lm_eval()
    with offline():
        tm = _task_manager(include, registry, root, plan_only=True)
        for n in names:
            try:
                tm._load_spec(n)
            except KeyError as e:
                raise CptError(f"task {n!r} is not an lm-eval task or group, nor declared by the given YAMLs") from e
        problems = tm._factory.problems
        if problems:
            more = f" (and {len(problems) - 1} more: {', '.join(t for t, _ in problems[1:6])}" \
                f"{', ...' if len(problems) > 6 else ''})" if len(problems) > 1 else ""
            raise CptError(problems[0][1] + more)
        return dict(tm._factory.splits)


def _check_task(name: str, tm) -> None:
    """Load the task (and its dataset) once, offline; a missing task or dataset is one clear line."""
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict([name], tm)
    except CptError:  # local benchmark data: already one line
        raise
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
              bootstrap_iters: int = 1000, quiet: bool = False, benchmark_data: str | os.PathLike | None = None) -> dict:
    """Run lm-eval's simple_evaluate offline; returns {"lm_eval": its results dict, "summary": summarize(..)}.

    `lm` is an lm-eval LM instance (MegatronLM) or a registry model name ("hf") with `model_args`.
    Collective when the LM is (MegatronLM): call on every rank with the same arguments.
    `benchmark_data`: read every task's data from that folder (module doc); the summary names each split.
    """
    import logging

    names, include, registry = resolve_tasks(specs)
    require_lm_eval()
    if benchmark_data is not None:
        _benchmark_root(benchmark_data)  # each task's files are checked as lm-eval builds it (LocalDataFactory)
    with offline():
        import lm_eval

        if quiet:
            for lg in ("lm-eval", "lm_eval", "datasets", "transformers"):
                logging.getLogger(lg).setLevel(logging.ERROR)
        tm = _task_manager(include, registry, benchmark_data)
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
    summary = summarize(res, names)
    if benchmark_data is not None:
        splits = getattr(tm._factory, "splits", {})
        for name, row in summary.items():
            used = sorted({splits[t] for t in _leaves(name, res.get("group_subtasks", {})) if t in splits})
            row["split"] = ",".join(used)
    return {"lm_eval": res, "summary": summary}


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
            if m in ("n", "higher_is_better", "group", "benchmark", "watch", "split") or m.endswith("_stderr") or "_stderr," in m:
                continue
            se = row.get(f"{m}_stderr") if "," not in m else row.get(m.replace(",", "_stderr,", 1))
            parts.append(f"{m} {v:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
        parts.append(f"n {row.get('n')}" + (f"  split {row['split']}" if row.get("split") else ""))
        lines.append("  ".join(parts))
    return lines
