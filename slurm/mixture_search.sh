#!/usr/bin/env bash
# `cpt mixture search` on Slurm: one proxy run per array task, then one job that fits the mixing law and
# writes the recommendation (it reuses every finished proxy; see docs/mixtures.md, "Choosing alpha").
#
#   export RECIPE=llama3_8b_medical ALPHAS=0,0.25,0.5,0.75,1 PROXY_STEPS=200
#   jid=$(sbatch --parsable slurm/prepare.sh)                                           # data + base, once
#   aid=$(sbatch --parsable --dependency=afterok:$jid --array=0-4 slurm/mixture_search.sh)   # one task per alpha
#   sbatch --dependency=afterok:$aid --gpus-per-node=0 slurm/mixture_search.sh               # fit (no GPU needed)
#
# --array must cover 0..(number of ALPHAS - 1). Each task runs its proxy on one node with NPROC local processes
# (`cpt train --nproc`, torchrun standalone); multi-node proxies are out of scope (use --proxy-model for a smaller
# one). A resubmitted task redoes an unfinished proxy from the start and skips a finished one (its metrics.json).
#SBATCH --job-name=cpt-mixture-search
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

# ---- knobs --------------------------------------------------------------------------------------------
RECIPE="${RECIPE:-tiny_cpu}"                       # recipe name (recipes/<name>.yaml) or path
OVERRIDES="${OVERRIDES:-}"                        # hydra overrides for every proxy, space-separated
ALPHAS="${ALPHAS:-0,0.25,0.5,0.75,1}"             # domain shares, one proxy each (the array indexes them)
PROXY_STEPS="${PROXY_STEPS:-}"                    # steps per proxy (empty: the command's default)
PROXY_MODEL="${PROXY_MODEL:-}"                    # a smaller model of the same family/tokenizer (empty: the base)
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" # repo on a filesystem all nodes see
recipe_name="$(basename "${RECIPE%.yaml}")"
OUT="${OUT:-$CPT_REPO/runs/mixture-search-$recipe_name}"  # the same folder for every task and the fit job
NPROC="${NPROC:-${SLURM_GPUS_ON_NODE:-1}}"         # processes per proxy
# -------------------------------------------------------------------------------------------------------

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_env
read -r -a cpt_cmd <<<"$CPT"
read -r -a extra <<<"$OVERRIDES"
args=(mixture search --recipe "$RECIPE" --alphas "$ALPHAS" --out "$OUT" --no-prepare)
if [ -n "$PROXY_STEPS" ]; then args+=(--proxy-steps "$PROXY_STEPS"); fi
if [ -n "$PROXY_MODEL" ]; then args+=(--proxy-model "$PROXY_MODEL"); fi
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  args+=(--proxy-index "$SLURM_ARRAY_TASK_ID" --nproc "$NPROC")   # one proxy, then stop
fi
"${cpt_cmd[@]}" "${args[@]}" "${extra[@]}"
