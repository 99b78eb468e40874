#!/usr/bin/env bash
# Tokenize a corpus on CPU nodes: an array job (one task per group of input shards) writes
# $OUT_PREFIX.part<NNN>.bin/.idx, then a merge job (afterok on the whole array) concatenates the parts
# in order into $OUT_PREFIX.bin/.idx. Parts are resumable: a rerun skips finished shards.
#
#   bash slurm/preprocess.sh          # from the repo root: submits the array and the merge job
#   (sbatch slurm/preprocess.sh does the same from inside a small job)
#
#SBATCH --job-name=cpt-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16            # = WORKERS + 1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

# ---- knobs --------------------------------------------------------------------------------------------
INPUT_GLOB="${INPUT_GLOB:-data/curated/*.jsonl.gz}"  # input shards (quote globs); sorted for a stable order
TOKENIZER="${TOKENIZER:-meta-llama/Meta-Llama-3-8B}" # HF dir, tokenizer.json, .model or .gguf
OUT_PREFIX="${OUT_PREFIX:-data/tokenized/corpus}"    # final PREFIX.bin/.idx
ARRAY_TASKS="${ARRAY_TASKS:-16}"                     # array size: each task takes every ARRAY_TASKS-th file
WORKERS="${WORKERS:-15}"                             # tokenizer processes per task
PREPROCESS_ARGS="${PREPROCESS_ARGS:---append-eod}"   # extra `cpt preprocess` flags
PARTITION="${PARTITION:-}"                           # CPU partition for both jobs; empty = default
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"    # repo checkout (with .venv) on a shared filesystem
# -------------------------------------------------------------------------------------------------------

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_env
read -r -a cpt_cmd <<<"$CPT"
read -r -a extra <<<"$PREPROCESS_ARGS"
mapfile -t files < <(compgen -G "$INPUT_GLOB" | sort)
[ "${#files[@]}" -gt 0 ] || { echo "preprocess: no files match INPUT_GLOB=$INPUT_GLOB" >&2; exit 2; }
tasks=$(( ARRAY_TASKS < ${#files[@]} ? ARRAY_TASKS : ${#files[@]} ))
part() { printf '%s.part%03d' "$OUT_PREFIX" "$1"; }

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  # ---- stage 1: one array task tokenizes files i, i+tasks, i+2*tasks, ...
  mine=()
  for ((i = SLURM_ARRAY_TASK_ID; i < ${#files[@]}; i += tasks)); do mine+=("${files[i]}"); done
  mkdir -p "$(dirname "$OUT_PREFIX")"
  exec "${cpt_cmd[@]}" preprocess --input "${mine[@]}" --tokenizer "$TOKENIZER" \
    --out "$(part "$SLURM_ARRAY_TASK_ID")" --workers "$WORKERS" "${extra[@]}"
elif [ "${STAGE:-}" = merge ]; then
  # ---- stage 2: merge the parts in array order (streaming; temp files + rename)
  parts=()
  for ((i = 0; i < tasks; i++)); do parts+=("$(part "$i")"); done
  exec python - "$OUT_PREFIX" "${parts[@]}" <<'PY'
import json, sys
from cpt_megatron.data.indexed import merge_datasets
print(json.dumps(merge_datasets(sys.argv[2:], sys.argv[1]), default=str))
PY
else
  # ---- submit: the array, then the merge after every array task succeeded
  opts=(--parsable "--export=ALL,CPT_REPO=$CPT_REPO")
  if [ -n "$PARTITION" ]; then opts+=(--partition="$PARTITION"); fi
  array_id=$(sbatch "${opts[@]}" --array="0-$((tasks - 1))" "$CPT_REPO/slurm/preprocess.sh")
  merge_id=$(sbatch "${opts[@]}" "--export=ALL,CPT_REPO=$CPT_REPO,STAGE=merge" --job-name=cpt-preprocess-merge \
    --cpus-per-task=2 --dependency="afterok:${array_id%%;*}" "$CPT_REPO/slurm/preprocess.sh")
  echo "preprocess: array job $array_id ($tasks tasks over ${#files[@]} files), merge job $merge_id -> $OUT_PREFIX"
fi
