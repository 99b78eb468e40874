#!/usr/bin/env bash
# Llama-3-8B continued pretraining: 2 nodes x 8 GPUs (1 node works too: set --nodes=1), TP 2 x DP 8,
# sequence parallel, distributed optimizer. `cpt estimate --model llama3-8b --gpus 16 --gpu h100 --tp 2
# --tokens 50e9`: ~48 GiB per GPU, ~1,800 H100-hours (~4.7 days) at 40% MFU.
#
#   sbatch slurm/cpt_8b.sh                               # from the repo root on a shared filesystem
#   RECIPE=recipes/my.yaml RUN_NAME=try2 sbatch slurm/cpt_8b.sh
#
#SBATCH --job-name=cpt_8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8           # one task per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12            # data loader workers + the main thread
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300           # USR1 to the batch shell before the limit: enough to save a checkpoint
#SBATCH --requeue                     # allow `scontrol requeue` and scheduler preemption to restart the job
#SBATCH --open-mode=append            # a requeued job appends to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- knobs --------------------------------------------------------------------------------------------
RECIPE="${RECIPE:-llama3_8b_medical}"               # recipe name (recipes/<name>.yaml) or path: all hyperparameters live there
RUN_NAME="${RUN_NAME:-${SLURM_JOB_NAME:-cpt_8b}-${SLURM_JOB_ID:-0}}"
                                                  # set RUN_NAME to resume a previous run from a new submission
RUN_ROOT="${RUN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs}"   # on a filesystem all nodes see
RUN_DIR="${RUN_DIR:-$RUN_ROOT/$RUN_NAME}"
LAYOUT="${LAYOUT:-parallel.tp=2 parallel.pp=1 parallel.sp=true parallel.distributed_optimizer=true}"
                                                  # must multiply out to nodes x GPUs: DP = world / (tp*pp)
OVERRIDES="${OVERRIDES:-}"                        # extra hydra overrides, space-separated
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" # repo checkout (with .venv) on a shared filesystem
export CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"     # pyxis/enroot image; empty = run on the host
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5  # see slurm/common.sh for the NCCL settings
# -------------------------------------------------------------------------------------------------------

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_train_job "$RECIPE" "$RUN_DIR" "$LAYOUT" "$OVERRIDES" || exit $?
