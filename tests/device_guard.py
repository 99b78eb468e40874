"""Test-only device guard: makes a CPU test fail on the device mix-ups a GPU run would hit.

`DeviceGuard` is a TorchFunctionMode that, while active, raises `DeviceMixError` when
1. one op gets tensors on different devices (0-dim CPU scalars excepted, as torch allows them), e.g. CPU
   tokens fed to a model on the `meta` device (the fake non-CPU device: run the model there with
   `runtime.device.device_override("meta")`; torch itself accepts `embedding(cpu_ids, meta_weight)`);
2. our code (a frame in one of `modules`) creates a tensor with a factory (zeros, arange, tensor, ...)
   without naming its device (on a GPU node that tensor would be on the CPU);
and it records every host sync (item/tolist/float/int/bool/cpu/numpy) made directly from our code in `syncs`.
Cross-device copies (`to`, `copy_`, `cpu`, `cuda`) are the legitimate way to move data and are allowed.
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["DeviceGuard", "DeviceMixError"]

_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.randint,
              torch.randn, torch.rand, torch.linspace, torch.eye}
_MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.type}
_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy}


EXCLUDE = (
    "cpt_megatron.runtime.cpu_redirects",  # megatron-core's own factories, redirected
    # host-side by design: checkpoint conversion streams tensors between files on the CPU
    "cpt_megatron.checkpoint.mapping", "cpt_megatron.checkpoint.io", "cpt_megatron.checkpoint.hf_import",
    "cpt_megatron.checkpoint.hf_export", "cpt_megatron.checkpoint.resize",
)


class DeviceMixError(AssertionError):
    pass


class DeviceGuard(TorchFunctionMode):
    def __init__(self, modules: tuple[str, ...] = ("cpt_megatron.",), factories: bool = True,
                 exclude: tuple[str, ...] = EXCLUDE):
        super().__init__()
        self.modules, self.factories, self.exclude = modules, factories, exclude
        self.syncs: list[str] = []

    def _ours(self) -> str | None:
        f = sys._getframe(2)  # 0: _ours, 1: __torch_function__, 2: the caller of the torch function
        name = f.f_globals.get("__name__", "")
        if name.startswith(self.modules) and not name.startswith(self.exclude):
            return f"{name}:{f.f_lineno} ({f.f_code.co_name})"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _MOVES:
            devs = {t.device for t in tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devs) > 1:
                where = self._ours() or "third-party code"
                raise DeviceMixError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devs))} "
                                     f"(called from {where})")
        if self.factories and func in _FACTORIES and kwargs.get("device") is None:
            where = self._ours()
            if where:
                raise DeviceMixError(f"torch.{func.__name__} without device= at {where}: name the device "
                                     "(runtime.device.current_device())")
        if func in _SYNCS:
            where = self._ours()
            if where:
                self.syncs.append(where)
        return func(*args, **kwargs)
