#!/usr/bin/env bash
# `cpt prepare` as a CPU-only Slurm job: import the recipe's base model, curate + tokenize its sources, build
# the mixture index and write the manifest `cpt train` checks. Single process (curation and tokenization use
# --cpus-per-task workers), resumable: a requeued or resubmitted job redoes only what is missing.
#
#   jid=$(sbatch --parsable slurm/prepare.sh)                                   # RECIPE=... OVERRIDES=...
#   PREPARE=none sbatch --dependency=afterok:$jid slurm/cpt_8b.sh               # train once it succeeded
#
# Give it the same RECIPE and OVERRIDES as the training job (the prepared data is keyed by them).
#SBATCH --job-name=cpt-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- knobs --------------------------------------------------------------------------------------------
RECIPE="${RECIPE:-tiny_cpu}"                       # recipe name (recipes/<name>.yaml) or path
OVERRIDES="${OVERRIDES:-}"                        # hydra overrides, space-separated, as for the training job
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" # repo on a filesystem all nodes see
# -------------------------------------------------------------------------------------------------------

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_env
read -r -a cpt_cmd <<<"$CPT"
read -r -a extra <<<"$OVERRIDES"
"${cpt_cmd[@]}" prepare --recipe "$RECIPE" --workers "${SLURM_CPUS_PER_TASK:-1}" "${extra[@]}"
