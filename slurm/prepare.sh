#!/usr/bin/env bash
# `cpt prepare` as a CPU-only Slurm job: import the recipe's base model, curate + tokenize its sources, build
# the mixture index and write the manifest `cpt train` checks. Single process (curation and tokenization use
# --cpus-per-task workers), resumable: a requeued or resubmitted job redoes only what is missing.
# `make preprocess` / `make prepare` run this same script on the node you are on (no Slurm needed).
#
#   jid=$(RECIPE=llama3_8b_medical sbatch --parsable slurm/prepare.sh)           # OVERRIDES="k=v ..." too
#   PREPARE=none sbatch --dependency=afterok:$jid slurm/cpt_8b.sh               # train once it succeeded
#   INPUT="a.jsonl b.jsonl" TOKENIZER=DIR OUT=data/x sbatch slurm/prepare.sh    # one corpus: cpt preprocess
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
RECIPE="${RECIPE:-}"                               # recipe name (recipes/<name>.yaml) or path
OVERRIDES="${OVERRIDES:-}"                        # hydra overrides, space-separated, as for the training job
INPUT="${INPUT:-}"                                # or one corpus: JSONL files, space-separated ...
TOKENIZER="${TOKENIZER:-}"                        # ... its tokenizer (HF dir, tokenizer.json, .model, .gguf)
OUT="${OUT:-}"                                    # ... and the output prefix (OUT.bin/.idx)
KEYS="${KEYS:-}"                                  # ... JSON fields to tokenize (default text; several: OUT_<key>)
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}"   # curation/tokenization processes
CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" # repo on a filesystem all nodes see
# -------------------------------------------------------------------------------------------------------

usage='give RECIPE=R [OVERRIDES="k=v ..."] (e.g. RECIPE=llama3_8b_medical), or INPUT="a.jsonl ..." TOKENIZER=DIR OUT=PREFIX for one corpus'
if [ -z "$RECIPE" ] && [ -z "$INPUT" ]; then echo "prepare.sh: $usage" >&2; exit 2; fi
if [ -n "$INPUT" ] && { [ -z "$TOKENIZER" ] || [ -z "$OUT" ]; }; then
  echo "prepare.sh: INPUT needs TOKENIZER=DIR and OUT=PREFIX too (INPUT=\"$INPUT\" TOKENIZER=DIR OUT=data/x)" >&2; exit 2
fi
if [ -n "$INPUT" ] && [ -n "$RECIPE" ]; then
  echo "prepare.sh: give RECIPE=... (a recipe's data) or INPUT=... (one corpus), not both" >&2; exit 2
fi

# shellcheck source=slurm/common.sh
source "$CPT_REPO/slurm/common.sh"
cpt_env
read -r -a cpt_cmd <<<"$CPT"
read -r -a extra <<<"$OVERRIDES"
if [ -n "$INPUT" ]; then
  read -r -a inputs <<<"$INPUT"
  read -r -a keys <<<"$KEYS"
  exec "${cpt_cmd[@]}" preprocess --input "${inputs[@]}" --tokenizer "$TOKENIZER" --out "$OUT" --workers "$WORKERS" \
    ${KEYS:+--json-keys "${keys[@]}"}
fi
exec "${cpt_cmd[@]}" prepare --recipe "$RECIPE" --workers "$WORKERS" "${extra[@]}"
