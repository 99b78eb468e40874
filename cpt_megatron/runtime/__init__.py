"""Runtime: distributed init (torchrun/srun), model-parallel state, seeding, CPU redirects for megatron-core."""

from cpt_megatron.runtime.distributed import (
    DistEnv,
    ParallelConfig,
    destroy_distributed,
    device,
    dist_env,
    init_distributed,
    seed_all,
    single_process_env,
    single_process_group,
)

__all__ = ["ParallelConfig", "DistEnv", "dist_env", "init_distributed", "destroy_distributed", "device", "seed_all",
           "single_process_env", "single_process_group"]
