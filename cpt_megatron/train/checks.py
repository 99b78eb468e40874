"""Every check a recipe must pass before training: one list, used by `cpt train` (on every rank, before
anything is written to run.dir or a process group exists) and by `cpt train --dry-run`.

`recipe_problems` returns readable problems (the dry run reports them all together); `check_recipe` raises
the first ones as one CptError.
"""

from __future__ import annotations

from cpt_megatron.config import RecipeConfig
from cpt_megatron.errors import CptError

__all__ = ["recipe_problems", "check_recipe", "layout", "parallel_problems", "check_writable", "check_run_dir",
           "eval_paths"]


def layout(cfg: RecipeConfig, world_size: int) -> tuple[int | None, list[str]]:
    """(dp, problems) of running `cfg` on `world_size` processes."""
    p, t = cfg.parallel, cfg.train
    mp = p.tp * p.pp * p.cp
    if world_size % mp:
        return None, [f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {mp}; "
                      "launch a multiple of tp*pp*cp processes"]
    dp = world_size // mp
    if t.global_batch % (t.micro_batch * dp):
        return dp, [f"train.global_batch={t.global_batch} is not divisible by train.micro_batch*dp = "
                    f"{t.micro_batch}*{dp}; use a multiple of {t.micro_batch * dp}"]
    if p.vpp and p.pp > 1:  # megatron-core's interleaved 1F1B runs groups of pp micro-batches (ValueError otherwise)
        micro = t.global_batch // (t.micro_batch * dp)
        out = []
        if micro % p.pp:
            out.append(f"train.global_batch={t.global_batch} gives {micro} micro-batches per step (global_batch / "
                       f"(micro_batch*dp)); with parallel.vpp it must be a multiple of parallel.pp={p.pp}: use a "
                       f"global_batch multiple of {p.pp * t.micro_batch * dp}")
        if cfg.eval.batches % p.pp:
            out.append(f"eval.batches={cfg.eval.batches} must be a multiple of parallel.pp={p.pp} with parallel.vpp "
                       "(the interleaved schedule evaluates groups of pp micro-batches)")
        return dp, out
    return dp, []


def parallel_problems(arch, parallel, seq_len: int) -> list[str]:
    """Every rule the model `arch` (ModelArch) must meet to be split as `parallel`: TP vs attention heads,
    KV heads and the MLP (ModelArch.check_parallel), equal pipeline stages (megatron-core asserts deep in
    the model build otherwise; uneven stages are not configured here), whole layers per virtual stage, and
    a sequence that sequence parallelism can split across TP ranks."""
    problems = _try(lambda: arch.check_parallel(parallel.tp))
    layers, pp, vpp = arch.num_layers, parallel.pp, parallel.vpp
    if layers % pp:
        problems.append(f"parallel.pp={pp} must divide num_hidden_layers={layers} (every pipeline stage holds "
                        f"the same number of layers); use a pp in {_divisors(layers)}")
    elif vpp and (layers // pp) % vpp:
        problems.append(f"parallel.vpp={vpp} must divide the {layers // pp} layers per pipeline stage "
                        f"(num_hidden_layers={layers} / pp={pp}); use a vpp in {_divisors(layers // pp)}")
    local_seq = seq_len // max(1, getattr(parallel, "cp", 1))
    if parallel.sp and parallel.tp > 1 and local_seq % parallel.tp:
        problems.append(f"data.seq_len={seq_len} must be divisible by parallel.tp={parallel.tp} x cp with "
                        "parallel.sp=true (sequence parallelism splits each sequence across TP ranks)")
    return problems


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def te_problems(cfg: RecipeConfig) -> list[str]:
    """fp8 / context parallel / TP comm overlap: valid only with the TE spec on this machine (model/build.py)."""
    from cpt_megatron.model.build import check_te_features
    from cpt_megatron.model.specs import select_kernels

    try:
        spec = select_kernels(cfg.model.options.spec).spec
        check_te_features(cfg.parallel, spec, cfg.train.fp8)
        if cfg.parallel.cp > 1 and cfg.data.seq_len % (2 * cfg.parallel.cp):
            raise CptError(f"data.seq_len={cfg.data.seq_len} must be divisible by 2 x parallel.cp = "
                           f"{2 * cfg.parallel.cp}")
    except CptError as e:
        return [str(e)]
    return []


def recipe_problems(cfg: RecipeConfig, world_size: int, arch=None, prepared: dict | None = None,
                    missing_listed: bool = False) -> list[str]:
    """Problems of `cfg` on `world_size` processes; `arch` (ModelArch) and `prepared` (the manifest) when known.
    `missing_listed`: the caller lists absent eval paths itself (`--dry-run`'s missing paths, `eval_paths`), so
    an absent benchmark folder or held-out file is not also a problem here."""
    problems = layout(cfg, world_size)[1] + te_problems(cfg)
    problems += _try(lambda: _check_model(cfg, arch))
    if arch is not None:
        problems += parallel_problems(arch, cfg.parallel, cfg.data.seq_len)
    problems += _try(lambda: _check_monitor(cfg))
    problems += _try(lambda: _check_mixture(cfg))
    problems += _try(lambda: _check_benchmark_data(cfg, missing_listed))
    problems += _try(lambda: _check_heldout(cfg, prepared, missing_listed))
    if cfg.train.ewc.kind == "ewc" and not any(s.group == "general" for s in cfg.data.sources):
        problems.append("train.ewc.kind=ewc needs a general (replay) source for the Fisher estimate")
    if prepared is not None:
        problems += _check_prepared_data(prepared)
    problems += _try(lambda: check_writable(cfg.run.dir))
    return problems


def check_recipe(cfg: RecipeConfig, world_size: int, arch=None, prepared: dict | None = None) -> None:
    problems = recipe_problems(cfg, world_size, arch, prepared)
    if problems:
        raise CptError("; ".join(problems))


def _run_identity(d: dict) -> dict:
    """What makes a run the same run across launches: the model it starts from and the data it trains on
    (not the schedule, lengths or knobs a resumed run may change)."""
    m, data = d.get("model") or {}, d.get("data") or {}
    return {"model": {k: m.get(k) for k in ("base", "hf", "gguf", "hf_config")},
            "sources": [(s.get("name"), s.get("group"), list(s.get("inputs") or []), s.get("prefix"))
                        for s in data.get("sources") or []]}


def check_run_dir(cfg: RecipeConfig) -> None:
    """Refuse a run.dir that holds another recipe's run (its config.yaml names another model or other data):
    resuming it would mix that run's checkpoints with this recipe and rewrite its config.yaml."""
    from pathlib import Path

    from cpt_megatron.config import to_dict
    from cpt_megatron.utils import read_yaml

    saved_path = Path(cfg.run.dir) / "config.yaml"
    if not saved_path.is_file():
        return
    saved = read_yaml(saved_path, "run config")
    if not isinstance(saved, dict) or _run_identity(saved) == _run_identity(to_dict(cfg)):
        return
    names = ", ".join(s[0] or "?" for s in _run_identity(saved)["sources"])
    what = saved.get("description") or f"sources {names}"
    raise CptError(f"run.dir {cfg.run.dir} holds another recipe's run ({what}; see {saved_path}); give this run its "
                   f"own run.dir=..., or delete {cfg.run.dir} to start over")


def _try(check) -> list[str]:
    try:
        check()
    except CptError as e:
        return [str(e)]
    return []


def _check_model(cfg: RecipeConfig, arch) -> None:
    from cpt_megatron.model.specs import select_kernels

    select_kernels(cfg.model.options.spec)
    if arch is not None:
        arch.check_seq_len(cfg.data.seq_len)


def _check_monitor(cfg: RecipeConfig) -> None:
    from cpt_megatron.eval.monitor import MonitorConfig

    try:
        MonitorConfig(**cfg.eval.monitor)
    except TypeError as e:
        raise CptError(f"eval.monitor: {e} (see MonitorConfig in cpt_megatron/eval/monitor.py)") from e


def _check_mixture(cfg: RecipeConfig) -> None:
    from cpt_megatron.train.plan import mixture_config

    try:
        mixture_config(cfg, {s.name: s.prefix or s.name for s in cfg.data.sources})
    except TypeError as e:
        raise CptError(f"data.phases: {e} (each phase is {{until: FRACTION, alpha: SHARE}})") from e
    except CptError as e:
        raise CptError(f"data: {e}") from e


def eval_paths(cfg: RecipeConfig) -> list[str]:
    """The eval paths of the recipe that do not exist yet (benchmark folder, held-out general files), one line each."""
    from pathlib import Path

    from cpt_megatron.train.prepare import resolve_path

    missing = []
    if cfg.eval.benchmark_data is not None and not Path(resolve_path(cfg.eval.benchmark_data)).is_dir():
        missing.append(f"eval.benchmark_data: {cfg.eval.benchmark_data} (DIR/<task>/<split>.jsonl, docs/benchmarks.md)")
    for g in cfg.eval.general:
        if not Path(resolve_path(g.path)).is_file():
            missing.append(f"eval.general[{g.name}].path: {g.path} (held-out general text)")
    return missing


def _check_benchmark_data(cfg: RecipeConfig, missing_listed: bool = False) -> None:
    """eval.benchmark_data: every file of every eval.benchmarks task there (nothing loaded), before training."""
    ev = cfg.eval
    if ev.benchmark_data is None:
        return
    if missing_listed and any(m.startswith("eval.benchmark_data") for m in eval_paths(cfg)):
        return  # listed as a missing path by the caller
    if not ev.benchmarks:
        raise CptError("eval.benchmark_data is set but eval.benchmarks is empty; add tasks, e.g. "
                       "eval.benchmarks=[{task: arc_easy, limit: 500}]")
    from cpt_megatron.eval.tasks import check_benchmark_data

    try:
        check_benchmark_data([b.task for b in ev.benchmarks], ev.benchmark_data)
    except CptError as e:
        raise CptError(f"eval.benchmark_data: {e}") from e


def _check_heldout(cfg: RecipeConfig, prepared: dict | None, missing_listed: bool = False) -> None:
    """eval.general: files there, names apart from the training sources', and (with the manifest) checked
    for overlap with the training text by `cpt prepare` in their current content."""
    from pathlib import Path

    from cpt_megatron.data.overlap import check_heldout
    from cpt_megatron.train.prepare import resolve_path
    from cpt_megatron.utils import sha256_file

    sources = {s.name for s in cfg.data.sources}
    for g in cfg.eval.general:
        if g.name in sources:
            raise CptError(f"eval.general[{g.name}]: the name of a training source; held-out sets need their own names")
        path = resolve_path(g.path)
        if missing_listed and not Path(path).is_file():
            continue
        if not Path(path).is_file():
            raise CptError(f"eval.general[{g.name}].path={g.path}: file not found (a .txt or .jsonl held-out set)")
        if prepared is None:
            continue
        entry = prepared.get("heldout", {}).get(g.name)
        if entry is None or entry.get("sha256") != sha256_file(path):
            raise CptError(f"eval.general[{g.name}] ({g.path}) has not been checked against the training sources "
                           "in its current content; run `cpt prepare` with this recipe first")
        check_heldout({g.name: entry}, cfg.eval.max_overlap)


def _check_prepared_data(prepared: dict) -> list[str]:
    from cpt_megatron.data.mixture import check_dataset_tokenizer

    out = []
    for s in prepared["sources"]:
        out += _try(lambda s=s: check_dataset_tokenizer(s["prefix"], int(prepared["vocab_size"])))
    return out


def check_writable(run_dir) -> None:
    """run.dir and its checkpoints/ accept new files (a probe created and removed), checked before step 1 so a
    read-only folder is not found at the first save, after the steps before it are spent. A folder that does not
    exist yet is checked through its nearest existing parent."""
    import os
    import tempfile
    from pathlib import Path

    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            fd, name = tempfile.mkstemp(prefix=".cpt-write-probe.", dir=probe)
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            raise CptError(f"run.dir: {probe} is not writable ({e.strerror}); checkpoints and logs go there: fix its "
                           "permissions or set run.dir to a writable folder") from None
