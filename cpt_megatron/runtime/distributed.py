"""Process-group setup from torchrun/srun environments, model-parallel init and seeding: one place."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket

import torch

from cpt_megatron.config import ParallelConfig
from cpt_megatron.runtime.device import check_megatron_core, on_gpu

__all__ = [
    "ParallelConfig", "DistEnv", "dist_env", "init_distributed", "destroy_distributed", "single_process_env",
    "single_process_group",
]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def dist_env() -> DistEnv:
    """torchrun variables first (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), then Slurm's (SLURM_PROCID, ...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env.get("MASTER_PORT", "0") or 0)
    if port == 0:
        port = _free_port() if world == 1 else 29500
    return DistEnv(rank, world, local, addr, port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_USE_AGENT_STORE")  # torchrun: init_process_group would join the agent store


@contextlib.contextmanager
def single_process_env():
    """Hide the launcher's rank variables (torchrun / srun) while one rank does single-process work that sets up
    its own 1-rank process group (e.g. importing the base model with its parity check before training starts)."""
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def single_process_group():
    """A 1-rank gloo process group for single-process work that needs torch.distributed (dist_checkpointing
    reads/writes, the importer's parity check); reuses an existing group. The launcher's rank variables are
    hidden meanwhile, so it also works inside a torchrun/srun task. CPU redirects it installs are removed after."""
    if torch.distributed.is_initialized():
        yield
        return
    from cpt_megatron.runtime import cpu_redirects

    redirect = not on_gpu() and not cpu_redirects.is_installed()
    if redirect:
        cpu_redirects.install()
    try:
        with single_process_env():
            torch.distributed.init_process_group("gloo", rank=0, world_size=1,
                                                 init_method=f"tcp://127.0.0.1:{_free_port()}")
            try:
                yield
            finally:
                torch.distributed.destroy_process_group()
    finally:
        if redirect:
            cpu_redirects.uninstall()


_installed_redirects = False  # init_distributed installed the CPU redirects (destroy_distributed removes them)


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> DistEnv:
    """Init torch.distributed (NCCL with CUDA, gloo without), megatron-core parallel state and RNGs.

    Without CUDA the CPU redirects (runtime/cpu_redirects.py) are installed first. The installed megatron-core
    must be the pinned release (one clear line otherwise).
    """
    check_megatron_core()
    from megatron.core import parallel_state

    from cpt_megatron.runtime import cpu_redirects

    global _installed_redirects
    denv = dist_env()
    cuda = on_gpu()
    if not cuda and not cpu_redirects.is_installed():
        cpu_redirects.install()
        _installed_redirects = True
    if cuda:
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        # The rendezvous address goes in init_method only: exporting MASTER_PORT here would make every later
        # subprocess of this process (tests, the demo) reuse a port whose store may still be listening.
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=denv.rank,
            world_size=denv.world_size,
            init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel.dp(denv.world_size)  # clear error when it does not divide
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_all(seed)
    return denv


def seed_all(seed: int) -> None:
    """Seed python/numpy/torch and the model-parallel RNG (same offsets as Megatron-LM: +100*pp_rank)."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if on_gpu():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from cpt_megatron.runtime.cpu_redirects import seed_model_parallel_rng

        seed_model_parallel_rng(seed, parallel_state.get_tensor_model_parallel_rank())


def destroy_distributed() -> None:
    """Tear down what init_distributed set up: parallel state, the process group, and the CPU redirects it installed."""
    global _installed_redirects
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if _installed_redirects:
        from cpt_megatron.runtime import cpu_redirects

        cpu_redirects.uninstall()
        _installed_redirects = False
