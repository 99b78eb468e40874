"""Runtime: distributed init (torchrun/srun), model-parallel state, seeding, CPU redirects for megatron-core,
the --nproc launcher and child-process hygiene.

The distributed names are loaded on first use, so `runtime.procs` / `runtime.launch` (imported by every
`cpt` command) do not pull in torch.
"""

__all__ = ["ParallelConfig", "DistEnv", "dist_env", "init_distributed", "destroy_distributed", "device", "seed_all",
           "single_process_env", "single_process_group"]


def __getattr__(name):
    if name in __all__:
        from cpt_megatron.runtime import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
