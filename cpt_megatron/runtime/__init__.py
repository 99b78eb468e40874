"""Runtime: distributed init (torchrun/srun), model-parallel state, seeding, CPU redirects for megatron-core."""

from cpt_megatron.runtime.device import current_device, device_override, on_gpu
from cpt_megatron.runtime.distributed import (
    DistEnv,
    ParallelConfig,
    destroy_distributed,
    dist_env,
    init_distributed,
    seed_all,
)

__all__ = ["current_device", "device_override", "on_gpu", "ParallelConfig", "DistEnv", "dist_env", "init_distributed", "destroy_distributed", "seed_all"]
