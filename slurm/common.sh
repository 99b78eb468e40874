#!/usr/bin/env bash
# Shared by every slurm/*.sh job script: environment, NCCL settings, optional container flags,
# run-directory layout, rendezvous from SLURM_* variables, launch with signal forwarding, and
# requeue on preemption. Job scripts `source` it after setting their knobs; it defines functions and
# sets nothing until they are called.
#
# Preemption protocol (shared with the trainer, cpt_megatron/train):
#   1. Slurm sends SIGUSR1 to this batch shell <seconds> before the time limit
#      (`#SBATCH --signal=B:USR1@<seconds>`), or an admin/test does `scancel --signal=USR1 --batch`.
#   2. cpt_launch's trap forwards the signal to the srun step, which delivers it to every task.
#   3. The trainer finishes the current step, saves a checkpoint and exits with 75 (EX_TEMPFAIL).
#   4. cpt_requeue_on_preempt sees 75 and runs `scontrol requeue $SLURM_JOB_ID`; the job keeps its id and
#      run directory, and `resume=auto` makes the requeued run continue from the checkpoint.
#   SIGTERM (scheduler preemption with PreemptMode=REQUEUE, or the end of GraceTime) takes the same path.
#
# Knobs read here (set them in the job script before sourcing, or export them before sbatch):
#   CPT_REPO         repo checkout on a shared filesystem (default: $SLURM_SUBMIT_DIR, i.e. sbatch from it)
#   VENV             Python virtualenv to activate (default: $CPT_REPO/.venv when present)
#   CPT              the cpt command (default: `cpt` on PATH, else `python -m cpt_megatron`)
#   CONTAINER_IMAGE  pyxis/enroot image (e.g. nvcr.io#nvidia/pytorch:25.01-py3 or a .sqsh); empty = none
#   CONTAINER_MOUNTS comma-separated src:dst mounts for the container (default: $CPT_REPO:$CPT_REPO)
#   MASTER_PORT      rendezvous port (default: 20000 + SLURM_JOB_ID % 20000, so jobs sharing a node differ)
#   MAX_REQUEUES     stop requeueing after this many restarts (default 50)
#   PREEMPT_EXIT_CODE the trainer's "saved, please requeue" code (default 75, EX_TEMPFAIL)

CPT_PREEMPT_EXIT_CODE="${PREEMPT_EXIT_CODE:-75}"

# --- environment -------------------------------------------------------------------------------------
cpt_env() {
  CPT_REPO="${CPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
  export CPT_REPO
  cd "$CPT_REPO" || { echo "cpt: CPT_REPO=$CPT_REPO does not exist on $(hostname)" >&2; return 1; }
  local venv="${VENV:-$CPT_REPO/.venv}"
  # shellcheck disable=SC1091  # the venv is created by `make setup`
  if [ -f "$venv/bin/activate" ]; then source "$venv/bin/activate"; fi
  if [ -z "${CPT:-}" ]; then
    if command -v cpt >/dev/null 2>&1; then CPT=cpt; else CPT="python -m cpt_megatron"; fi
  fi
  export PYTHONUNBUFFERED=1
  # One OpenMP thread pool per task sized to its CPUs (torch otherwise oversubscribes the node).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  # megatron-core's TP/SP communication overlap needs kernels queued in issue order.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  # Turn NCCL errors and hangs into exceptions instead of silent stalls (torch >= 2.2 name).
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  cpt_nccl_env
}

# NCCL settings. Defaults are safe for InfiniBand/RoCE clusters; each line says when to change it.
cpt_nccl_env() {
  # WARN shows only problems; INFO prints the chosen transport per ring (use it once when bringing up a cluster).
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Longer IB retry timeout (2^22 us): avoids spurious "transport retry count exceeded" on busy fabrics.
  export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
  # Interface for NCCL's bootstrap and socket transport. Unset = NCCL picks; set e.g. "ib0" or "^docker,lo"
  # if NCCL picks a container bridge or a slow management NIC.
  if [ -n "${NCCL_SOCKET_IFNAME:-}" ]; then export NCCL_SOCKET_IFNAME; fi
  # HCAs to use, e.g. "mlx5_0,mlx5_1" (leave unset to use all). Set NCCL_IB_DISABLE=1 on Ethernet-only clusters.
  if [ -n "${NCCL_IB_HCA:-}" ]; then export NCCL_IB_HCA; fi
  # GPUDirect RDMA between the NIC and GPUs on the same PCIe switch; raise to SYS only if topology allows.
  export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
  # AWS EFA / GCP: their plugins set their own values; export NCCL_* in the job script to override these.
}

# --- run directory -----------------------------------------------------------------------------------
# <RUN_DIR>/               the trainer's run.dir: checkpoints/, metrics.jsonl, config (written by cpt train)
# <RUN_DIR>/slurm/         one <jobid>.<restart>.env file per (re)start: nodes, tasks, git revision
cpt_run_dir() {
  local dir="$1"
  mkdir -p "$dir/slurm"
  {
    echo "job=${SLURM_JOB_ID:-} name=${SLURM_JOB_NAME:-} restart=${SLURM_RESTART_COUNT:-0}"
    echo "nodes=${SLURM_JOB_NODELIST:-} ntasks=${SLURM_NTASKS:-} started=$(date -Is)"
    echo "git=$(git -C "$CPT_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  } >"$dir/slurm/${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}.env"
}

# --- rendezvous --------------------------------------------------------------------------------------
# Job level (in the batch shell): MASTER_ADDR = first host of the allocation, MASTER_PORT from the job id.
cpt_rendezvous() {
  if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm allocation}" | head -n1)"
  fi
  MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  export MASTER_ADDR MASTER_PORT
}

# Task level (inside each srun task): the torchrun-style variables the trainer reads.
cpt_task_env() {
  export RANK="${SLURM_PROCID:?not inside an srun step}"
  export WORLD_SIZE="${SLURM_NTASKS:?not inside an srun step}"
  export LOCAL_RANK="${SLURM_LOCALID:-0}"
  local per_node="${SLURM_TASKS_PER_NODE:-1}"
  export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${per_node%%(*}}"
}

# --- launch ------------------------------------------------------------------------------------------
# cpt_container_flags: the pyxis flags for srun (none without CONTAINER_IMAGE), in the array CPT_CONTAINER.
cpt_container_flags() {
  CPT_CONTAINER=()
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    CPT_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$CPT_REPO:$CPT_REPO}"
                   --container-workdir="$CPT_REPO")
  fi
}

# cpt_prepare_step RECIPE [OVERRIDES...]: `cpt prepare` as its own one-task job step (import the base model,
# curate, tokenize, build the mixture index; resumable, and a quick hash check when already done). Set
# PREPARE=none when slurm/prepare.sh already ran it on a CPU node (sbatch --dependency=afterok:<its job id>).
cpt_prepare_step() {
  if [ "${PREPARE:-step}" = "none" ]; then return 0; fi
  local recipe=$1
  shift
  local -a cpt_cmd
  read -r -a cpt_cmd <<<"$CPT"
  cpt_container_flags
  # SC2086: SRUN_EXTRA_ARGS is a word list.
  # shellcheck disable=SC2086
  srun --export=ALL --ntasks=1 --nodes=1 "${CPT_CONTAINER[@]}" ${SRUN_EXTRA_ARGS:-} \
    "${cpt_cmd[@]}" prepare --recipe "$recipe" "$@"
}

# cpt_launch CMD [ARGS...]: one task per GPU (or per --ntasks) via srun, each with cpt_task_env applied.
# Forwards USR1/TERM from the batch shell to the step and returns the step's exit code.
cpt_launch() {
  cpt_container_flags
  local -a container=("${CPT_CONTAINER[@]}")
  # `bash -c` sources this file inside each task so RANK etc. come from that task's SLURM_* values.
  # SC2016: $CPT_REPO and $@ are expanded by the task's shell. SC2086: SRUN_EXTRA_ARGS is a word list.
  # shellcheck disable=SC2016,SC2086
  srun --export=ALL "${container[@]}" ${SRUN_EXTRA_ARGS:-} \
    bash -c 'source "$CPT_REPO/slurm/common.sh" && cpt_task_env && exec "$@"' cpt-task "$@" &
  CPT_SRUN_PID=$!
  trap 'cpt_forward USR1' USR1
  trap 'cpt_forward TERM' TERM
  local rc
  while :; do
    wait "$CPT_SRUN_PID"
    rc=$?
    # wait returns >128 when a trapped signal interrupted it; the step is still running: wait again.
    if [ "$rc" -gt 128 ] && kill -0 "$CPT_SRUN_PID" 2>/dev/null; then continue; fi
    break
  done
  trap - USR1 TERM
  return "$rc"
}

cpt_forward() {
  echo "cpt: got SIG$1 at $(date -Is); forwarding to the training step (it saves and exits $CPT_PREEMPT_EXIT_CODE)" >&2
  # srun relays the signal to every task of the step
  kill -s "$1" "$CPT_SRUN_PID" 2>/dev/null || true
}

# --- requeue -----------------------------------------------------------------------------------------
# cpt_requeue_on_preempt RC: requeue the job when the trainer saved and asked for it; returns the code the
# batch script should exit with.
cpt_requeue_on_preempt() {
  local rc="$1"
  if [ "$rc" != "$CPT_PREEMPT_EXIT_CODE" ]; then return "$rc"; fi
  local restarts="${SLURM_RESTART_COUNT:-0}" max="${MAX_REQUEUES:-50}"
  if [ "$restarts" -ge "$max" ]; then
    echo "cpt: preempted after $restarts restarts (MAX_REQUEUES=$max); not requeueing. Resubmit to continue." >&2
    return "$rc"
  fi
  echo "cpt: trainer saved a checkpoint and exited $rc; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))" >&2
  if scontrol requeue "$SLURM_JOB_ID"; then
    return 0
  fi
  echo "cpt: scontrol requeue failed (cancelled job, or JobRequeue disabled); resubmit the script to resume" >&2
  return "$rc"
}

# One training job, shared by the GPU job scripts: environment, rendezvous, run dir, the `cpt prepare` step,
# the training step, and requeue on the preemption exit code. Args: RECIPE RUN_DIR "LAYOUT overrides" "extra overrides".
cpt_train_job() {
    local recipe=$1 run_dir=$2 rc=0
    local -a cpt_cmd layout extra
    cpt_env
    cpt_rendezvous
    cpt_run_dir "$run_dir"
    read -r -a cpt_cmd <<<"$CPT"
    read -r -a layout <<<"$3"
    read -r -a extra <<<"$4"
    cpt_prepare_step "$recipe" run.dir="$run_dir" "${layout[@]}" "${extra[@]}" || return $?
    cpt_launch "${cpt_cmd[@]}" train --recipe "$recipe" resume=auto run.dir="$run_dir" "${layout[@]}" "${extra[@]}" || rc=$?
    cpt_requeue_on_preempt "$rc"
}
