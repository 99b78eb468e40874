"""The one place that decides the compute device, and the megatron-core version this code is written for.

Every tensor our code creates for the model (tokens, positions, pipeline buffers, loss accumulators,
collective payloads) names `current_device()`; nothing else in the package calls `torch.cuda.is_available()`
to pick a device. On a GPU node it is `cuda:<local rank>` (set by `init_distributed`), else `cpu`.

Tests run the model on the `meta` device (a fake non-CPU device: shapes only, no data) with
`device_override("meta")`, so a tensor created without naming the device is a mix-up the test sees.
"""

from __future__ import annotations

import contextlib

import torch

from cpt_megatron.errors import CptError

__all__ = ["current_device", "comm_device", "on_gpu", "device_override", "MEGATRON_CORE_VERSION", "check_megatron_core",
           "megatron_core_version"]

MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core release this code (and runtime/cpu_redirects.py) is written against; pinned in pyproject."""

_override: torch.device | None = None


def on_gpu() -> bool:
    """True when the model runs on CUDA (NCCL, bf16 by default, TE when present)."""
    return _override is None and torch.cuda.is_available()


def current_device() -> torch.device:
    """The device every model tensor lives on: cuda:<current> on a GPU node, else cpu (or the test override)."""
    if _override is not None:
        return _override
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device(group=None) -> torch.device:
    """Where a collective's payload must live: the compute device under NCCL; the CPU under gloo (e.g. the 1-rank
    gloo group import-hf/export-hf convert in, whose parity check runs on the GPU model)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend(group) == "gloo":
        return torch.device("cpu")
    return current_device()


@contextlib.contextmanager
def device_override(dev):
    """Test hook: make `current_device()` return `dev` (e.g. "meta") inside the block."""
    global _override
    prev, _override = _override, torch.device(dev)
    try:
        yield _override
    finally:
        _override = prev


def megatron_core_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("megatron-core")
    except md.PackageNotFoundError:
        return None


def check_megatron_core() -> str:
    """Raise one clear line unless the installed megatron-core is the pinned release; returns its version."""
    found = megatron_core_version()
    if found != MEGATRON_CORE_VERSION:
        raise CptError(
            f"megatron-core {found or 'is not installed'}{'' if found is None else ' is installed'}: cpt-megatron needs "
            f"megatron-core=={MEGATRON_CORE_VERSION} (pip install 'megatron-core=={MEGATRON_CORE_VERSION}')"
        )
    return found
