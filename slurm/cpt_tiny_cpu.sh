#!/usr/bin/env bash
# Tiny CPU continued-pretraining run under Slurm: the same structure as cpt_70b.sh, 2 tasks, no GPU.
# Used by tests/test_slurm.py and to try the Slurm path on a laptop cluster (tests/slurm_setup.sh).
#
#   sbatch slurm/cpt_tiny_cpu.sh                          # from the repo root
#   RUN_DIR=/tmp/tiny sbatch slurm/cpt_tiny_cpu.sh        # knobs can also come from the environment
#
#SBATCH --job-name=cpt-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks=2                    # world size: 2 processes (gloo on CPU)
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60            # USR1 to the batch shell 60 s before the limit: save, requeue
#SBATCH --requeue                     # allow `scontrol requeue` (and scheduler preemption) to restart it
#SBATCH --open-mode=append            # a requeued job appends to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- knobs --------------------------------------------------------------------------------------------
RECIPE="${RECIPE:-tiny_cpu}"                       # recipe name (recipes/<name>.yaml) or path
RUN_DIR="${RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/${SLURM_JOB_NAME:-cpt-tiny-cpu}-${SLURM_JOB_ID:-0}}"
                                                  # keep it stable across requeues: the job id survives them
OVERRIDES="${OVERRIDES:-}"                        # extra hydra overrides, space-separated (e.g. "train.steps=20")
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" # repo on a filesystem all nodes see
# -------------------------------------------------------------------------------------------------------

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_env
cpt_rendezvous
cpt_run_dir "$RUN_DIR"

read -r -a cpt_cmd <<<"$CPT"
read -r -a extra <<<"$OVERRIDES"
cpt_prepare_step "$RECIPE" run.dir="$RUN_DIR" "${extra[@]}" || exit $?   # step 1: data + base model (one task)
rc=0
cpt_launch "${cpt_cmd[@]}" train --recipe "$RECIPE" resume=auto run.dir="$RUN_DIR" "${extra[@]}" || rc=$?
cpt_requeue_on_preempt "$rc" || exit $?
