#!/usr/bin/env python
"""Load a cpt-megatron checkpoint with Megatron-LM's OWN `load_checkpoint` (issue 28 item 4), on CPU.

Parses the checkpoint's `megatron_args.txt` flags with Megatron-LM's `parse_args` + `validate_args` (as
`pretrain_gpt.py` would), with `--finetune` or, instead, `--no-load-optim --no-load-rng`, then calls its
`load_checkpoint(strict=True)` on megatron-core GPTModel chunks and compares every tensor with what
cpt-megatron's own loader reads.

    git -C MEGATRON_LM archive core_v0.16.1 megatron | tar -x -C /tmp/mlm_src
    PYTHONPATH=/tmp/mlm_src:. python experiments/megatron_lm_load_check.py CKPT_ROOT [finetune|nofinetune]

Prints `RESULT mode=... iteration=... all_equal_to_cpt_load=True`, or Megatron-LM's own error (e.g.
check_checkpoint_args's `add_position_embedding value from checkpoint (False) ...`). Two shims let its
training code run without CUDA or triton: `read_metadata` all-reduces the iteration on `device='cuda'` (one
rank here: skipped), and `batch_invariant_kernels` (triton) is stubbed; neither touches loading.
"""

from __future__ import annotations

import os
import sys
import types


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


def main(ckpt: str, mode: str) -> None:
    sys.modules["megatron.core.transformer.custom_layers.batch_invariant_kernels"] = _Stub("bik")
    import torch
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.training import checkpointing as C
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    from cpt_megatron.checkpoint import arch_from_ckpt, load_model_weights
    from cpt_megatron.checkpoint import layout as ckpt_layout
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, init_distributed

    text = (ckpt_layout.resolve(ckpt) / "megatron_args.txt").read_text()
    flags = " ".join(ln.rstrip("\\") for ln in text.splitlines() if not ln.startswith("#")).split()
    flags[flags.index("--load") + 1] = os.path.abspath(ckpt)  # a copied folder keeps the original's --load
    flags = [f for f in flags if f != "--finetune"]
    flags += ["--finetune"] if mode == "finetune" else ["--no-load-optim", "--no-load-rng"]
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    sys.argv = ["pretrain_gpt.py", *flags, "--micro-batch-size", "1", "--global-batch-size", "1",
                "--seq-length", "64", "--train-iters", "10", "--lr", "1e-4", "--mock-data", "--transformer-impl", "local"]
    args = parse_args()
    validate_args(args, {})
    set_args(args)  # + the microbatch calculator, as set_global_variables does
    init_num_microbatches_calculator(args.rank, args.rampup_batch_size, args.global_batch_size,
                                     args.micro_batch_size, args.data_parallel_size, args.decrease_batch_size_if_needed)
    init_distributed(ParallelConfig(), seed=1)

    read_metadata = C.read_metadata

    def read_metadata_one_rank(tracker):
        real = torch.distributed.is_initialized
        torch.distributed.is_initialized = lambda: False
        try:
            return read_metadata(tracker)
        finally:
            torch.distributed.is_initialized = real

    C.read_metadata = read_metadata_one_rank
    arch = arch_from_ckpt(ckpt)
    opts = ModelOptions(dtype="fp32", spec="local", initialize=True)
    theirs, ours = build_model(arch, ParallelConfig(), opts), build_model(arch, ParallelConfig(), opts)
    load_model_weights(ours, ckpt)
    iteration, _ = C.load_checkpoint(theirs, None, None, strict=True)
    a, b = theirs[0].state_dict(), ours[0].state_dict()
    keys = [k for k in a if torch.is_tensor(a[k]) and not k.endswith("_extra_state")]
    same = all(torch.equal(a[k], b[k]) for k in keys)
    print(f"RESULT mode={mode} iteration={iteration} finetune={args.finetune} tensors={len(keys)} "
          f"all_equal_to_cpt_load={same}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "nofinetune")
