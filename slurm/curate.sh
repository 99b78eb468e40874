#!/usr/bin/env bash
# Curate a corpus on many CPU nodes: three dependent jobs running `cpt curate --shards N --stage S --task K`
# (cpt_megatron/curate/distributed.py). The result (shards, report.json) is byte-identical to a one-process
# `cpt curate` of the same inputs and recipe, whatever ARRAY_TASKS is.
#   1. sketch  (array of ARRAY_TASKS): shard K of the input files -> filters, exact keys, shingle sets, sketches
#   2. buckets (array of ARRAY_TASKS, afterok on 1): partition K of exact keys + LSH bands -> duplicate candidates
#   3. write   (one task, afterok on 2): replays the shards in input order with the decisions -> OUT
# Every task is resumable: a finished task's folder in WORK appears atomically and a rerun skips it, so
# resubmitting after a failure (or a requeue) redoes only the missing tasks.
#
#   bash slurm/curate.sh                  # from the repo root: submits the three jobs, prints their ids
#   INPUT="data/raw/a data/raw/b" OUT=data/curated RECIPE=recipes/curate/medquad.yaml bash slurm/curate.sh
#
#SBATCH --job-name=cpt-curate
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8             # the submit step overrides it: WORKERS for sketch, 1 for the others
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

# ---- knobs --------------------------------------------------------------------------------------------
INPUT="${INPUT:-data/raw}"                        # input files/directories, space-separated (sharded by file; big .jsonl files by byte range)
OUT="${OUT:-data/curated}"                        # output folder (shards + report.json), as `cpt curate -o`
WORK="${WORK:-$OUT.work}"                         # stage outputs, on a filesystem every node sees
RECIPE="${RECIPE:-}"                              # curate recipe YAML (recipes/curate/*.yaml); empty = defaults
ARRAY_TASKS="${ARRAY_TASKS:-16}"                  # shards: array size of the sketch and buckets jobs
WORKERS="${WORKERS:-8}"                           # processes (= CPUs) per sketch task (per-document stages)
CURATE_ARGS="${CURATE_ARGS:-}"                    # extra `cpt curate` flags, e.g. "--stages normalize,length"
PARTITION="${PARTITION:-}"                        # CPU partition for the three jobs; empty = default
LOG_DIR="${LOG_DIR:-}"                            # folder for the jobs' logs; empty = the repo (CPT_REPO)
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" # repo checkout (with .venv) on a shared filesystem
# -------------------------------------------------------------------------------------------------------

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_env

if [ -n "${STAGE:-}" ]; then
  # ---- inside a job: one task of one stage
  read -r -a cpt_cmd <<<"$CPT"
  read -r -a inputs <<<"$INPUT"
  read -r -a extra <<<"$CURATE_ARGS"
  args=()
  for i in "${inputs[@]}"; do args+=(--input "$i"); done
  if [ -n "$RECIPE" ]; then args+=(--config "$RECIPE"); fi
  exec "${cpt_cmd[@]}" curate "${args[@]}" --out "$OUT" --work "$WORK" --shards "$ARRAY_TASKS" \
    --stage "$STAGE" --task "${SLURM_ARRAY_TASK_ID:-0}" --workers "$WORKERS" --no-progress --json "${extra[@]}"
else
  # ---- submit: sketch array -> buckets array -> write, each after every task of the previous succeeded
  opts=(--parsable "--export=ALL,CPT_REPO=$CPT_REPO")
  if [ -n "$PARTITION" ]; then opts+=(--partition="$PARTITION"); fi
  if [ -n "$LOG_DIR" ]; then mkdir -p "$LOG_DIR"; opts+=(--output="$LOG_DIR/%x-%A_%a.out"); fi
  last=$((ARRAY_TASKS - 1))
  sketch=$(sbatch "${opts[@]}" "--export=ALL,CPT_REPO=$CPT_REPO,STAGE=sketch" --job-name=cpt-curate-sketch \
    --cpus-per-task="$WORKERS" --array="0-$last" "$CPT_REPO/slurm/curate.sh")
  buckets=$(sbatch "${opts[@]}" "--export=ALL,CPT_REPO=$CPT_REPO,STAGE=buckets" --job-name=cpt-curate-buckets \
    --cpus-per-task=1 --array="0-$last" --dependency="afterok:${sketch%%;*}" "$CPT_REPO/slurm/curate.sh")
  write=$(sbatch "${opts[@]}" "--export=ALL,CPT_REPO=$CPT_REPO,STAGE=write" --job-name=cpt-curate-write \
    --cpus-per-task=1 --dependency="afterok:${buckets%%;*}" "$CPT_REPO/slurm/curate.sh")
  echo "curate: sketch=${sketch%%;*} buckets=${buckets%%;*} write=${write%%;*} ($ARRAY_TASKS tasks) -> $OUT"
fi
