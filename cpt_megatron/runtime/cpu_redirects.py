"""Run megatron-core's training machinery on CPU (gloo) by redirecting its few CUDA-only spots.

Used ONLY when CUDA is absent (`install_if_needed()` is a no-op on a GPU machine), and only in the processes
that run megatron-core (training / conversion workers): never in the test runner (tests/conftest.py forbids
it; tests that need megatron-core on CPU run it in a subprocess). megatron-core 0.16.1
is not forked or vendored: we swap the `torch` global of a fixed list of its modules for a thin proxy
that maps CUDA device requests to the CPU, plus two process-wide changes that cannot be scoped to a
module. Everything that changes is listed here, in one place:

1. Per-module `torch` proxy (`_TorchOnCpu`) in `_MODULES` below. It forwards every attribute to real
   torch, except:
   - tensor factories (`tensor`, `zeros`, `ones`, `empty`, `full`, `arange`, ...) rewrite a CUDA device
     (`'cuda'`, `'cuda:N'`, an int, a `torch.device('cuda')`) to CPU. Covers the literal `device='cuda'`
     tensors in schedules (token counters), optimizers (`found_inf`, scale), clip_grads, DDP buffers,
     and `dist_checkpointing` save's verification broadcast.
   - `torch.cuda` becomes `_CudaOnCpu`: `current_device()` -> 'cpu', `synchronize`/`empty_cache` no-ops,
     `Stream`/`stream`/`default_stream`/`current_stream` do nothing (communication is synchronous on
     gloo), and the CUDA RNG calls use the CPU generator.
   - `torch.autocast('cuda', ...)` becomes a CPU autocast.
2. `torch.Tensor.type()` without arguments reports CPU float tensors as `torch.cuda.*Tensor`, because the
   optimizers (optimizer.py / distrib_optimizer.py / clip_grads.py) accept only those type strings for
   their parameters. Process-wide, but only in processes that call `install()` (our training and
   conversion workers), and only for the no-argument form.
   `torch.Tensor.cuda()` returns the tensor itself (there is no CUDA to move to): megatron-core calls it on
   the tied embedding with PP > 1 (language_module.py: `weight.data = weight.data.cuda()`) and in a few
   optimizer paths.
3. The model-parallel RNG tracker is replaced by `CpuRNGStatesTracker`, which keeps one CPU generator
   state per name and swaps it into the global CPU generator inside `fork()` (the same semantics the
   CUDA tracker has for the CUDA generator). `seed_model_parallel_rng()` installs it.
4. `dist_checkpointing.save` needs `psutil` in its writer processes (undeclared dependency of the
   wheel; without it the save hangs forever). We check it at install time and fail with one line.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from cpt_megatron.errors import CptError

__all__ = ["install", "uninstall", "install_if_needed", "is_installed", "CpuRNGStatesTracker", "seed_model_parallel_rng"]

# megatron-core modules whose module-global `torch` is replaced (0.16.1, pinned: a missing module or one that
# no longer imports `torch` as a global is an error, never skipped).
_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.timers",
)

_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "zeros_like", "ones_like",
    "empty_like", "full_like", "as_tensor",
)
_installed = False
_saved: dict = {}  # what install() replaced, restored by uninstall()


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _redirect_factory(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    return wrapper


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


class _CudaOnCpu:
    """What megatron-core sees as `torch.cuda` on a CPU machine."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def empty_cache():
        pass

    Stream = _NullStream

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _NullStream()

    current_stream = default_stream

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def memory_allocated(*args, **kwargs):
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated


class _TorchOnCpu:
    """Module-level stand-in for `torch` in the megatron-core modules listed in `_MODULES`."""

    cuda = _CudaOnCpu()

    def __init__(self):
        for name in _FACTORIES:
            setattr(self, name, _redirect_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type="cuda", *args, **kwargs):
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


_TORCH_ON_CPU = _TorchOnCpu()
_orig_tensor_type = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        name = _orig_tensor_type(self)  # (under a TorchFunctionMode this may already be the patched answer)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return _orig_tensor_type(self, dtype, non_blocking, **kwargs)


def _tensor_cuda(self, *args, **kwargs):
    return self


class CpuRNGStatesTracker:
    """Model-parallel RNG tracker for CPU: named generator states swapped into the CPU generator by `fork`."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise CptError(f"rng seed {seed} already used")
        if name in self.states_:
            raise CptError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise CptError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_model_parallel_rng(seed: int, tp_rank: int, ep_rank: int = 0) -> None:
    """CPU counterpart of `tensor_parallel.model_parallel_cuda_manual_seed` (same seed offsets)."""
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CpuRNGStatesTracker()
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + 100 * ep_rank + tp_rank + 1)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed + 11)
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)


def is_installed() -> bool:
    return _installed


def install() -> None:
    """Apply the redirects (idempotent). Call before building megatron-core models/optimizers; `uninstall()` (done
    by `destroy_distributed` / the conversion group's exit) puts everything back."""
    global _installed
    if _installed:
        return
    try:
        import psutil  # noqa: F401
    except ImportError as e:  # pragma: no cover - declared dependency
        raise RuntimeError("psutil is required by megatron-core dist_checkpointing (pip install psutil)") from e
    from cpt_megatron.runtime.device import check_megatron_core

    check_megatron_core()
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise RuntimeError(f"cpu_redirects: megatron-core module {name} is missing ({e}); "
                               "runtime/cpu_redirects.py._MODULES is written for the pinned megatron-core") from e
        if getattr(module, "torch", None) not in (torch, _TORCH_ON_CPU):
            raise RuntimeError(f"cpu_redirects: {name} has no module-global `torch` to redirect; "
                               "update runtime/cpu_redirects.py._MODULES for this megatron-core")
        _saved[name] = module.torch
        module.torch = _TORCH_ON_CPU
    _saved["Tensor.type"], _saved["Tensor.cuda"] = torch.Tensor.type, torch.Tensor.cuda
    torch.Tensor.type = _tensor_type
    torch.Tensor.cuda = _tensor_cuda
    from megatron.core.tensor_parallel import random as mp_random

    _saved["rng"] = (mp_random.CudaRNGStatesTracker, mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state)
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # `_get/_set_cuda_rng_state` are module functions that index torch.cuda.default_generators.
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _installed = True


def uninstall() -> None:
    """Undo `install()` (idempotent): megatron-core's modules get the real torch back, Tensor.type/.cuda are real."""
    global _installed
    if not _installed:
        return
    import sys

    for name in _MODULES:
        sys.modules[name].torch = _saved.pop(name)
    torch.Tensor.type, torch.Tensor.cuda = _saved.pop("Tensor.type"), _saved.pop("Tensor.cuda")
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.CudaRNGStatesTracker, mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state = _saved.pop("rng")
    _installed = False


def install_if_needed() -> bool:
    """Install the redirects when CUDA is absent. Returns True when they are active."""
    if torch.cuda.is_available():
        return False
    install()
    return True


