"""Runtime: distributed init (torchrun/srun), model-parallel state, seeding, CPU redirects for megatron-core,
the --nproc launcher and child-process hygiene.

The distributed names are loaded on first use, so `runtime.procs` / `runtime.launch` (imported by every
`cpt` command) do not pull in torch. `runtime.device` decides the compute device (one place).
"""

__all__ = ["current_device", "device_override", "on_gpu", "ParallelConfig", "DistEnv", "dist_env", "init_distributed",
           "destroy_distributed", "seed_all", "single_process_env", "single_process_group"]

_DEVICE = ("current_device", "device_override", "on_gpu")


def __getattr__(name):
    if name in _DEVICE:
        from cpt_megatron.runtime import device

        return getattr(device, name)
    if name in __all__:
        from cpt_megatron.runtime import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
