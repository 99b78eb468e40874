#!/usr/bin/env bash
# Checkpoint conversion on one CPU node (no GPU needed): HF -> Megatron before training, or the trained
# Megatron checkpoint -> HF safetensors after it. A 70B model needs ~2x its bf16 size in RAM (~300 GB).
#
#   DIRECTION=import HF_DIR=/models/Meta-Llama-3-8B CKPT=ckpt/llama3-8b sbatch slurm/convert.sh
#   DIRECTION=export CKPT=runs/cpt_8b-1234/checkpoints/latest HF_DIR=export/llama3-8b-med sbatch slurm/convert.sh
#
#SBATCH --job-name=cpt-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0                       # all of the node's memory
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- knobs --------------------------------------------------------------------------------------------
DIRECTION="${DIRECTION:-import}"                  # import (HF -> Megatron) | export (Megatron -> HF)
HF_DIR="${HF_DIR:?set HF_DIR: the HF model directory (import: read, export: written)}"
CKPT="${CKPT:?set CKPT: the Megatron checkpoint directory (import: written, export: read)}"
CONVERT_ARGS="${CONVERT_ARGS:-}"                  # extra flags for cpt import-hf / export-hf
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" # repo checkout (with .venv) on a shared filesystem
# -------------------------------------------------------------------------------------------------------

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_env
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
read -r -a cpt_cmd <<<"$CPT"
read -r -a extra <<<"$CONVERT_ARGS"
case "$DIRECTION" in
  import) exec "${cpt_cmd[@]}" import-hf --hf "$HF_DIR" --out "$CKPT" "${extra[@]}" ;;
  export) exec "${cpt_cmd[@]}" export-hf --ckpt "$CKPT" --out "$HF_DIR" "${extra[@]}" ;;
  *) echo "convert: DIRECTION must be import or export, got '$DIRECTION'" >&2; exit 2 ;;
esac
