# shellcheck shell=bash
# Shared by slurm/*.sbatch: one torchrun per node, rendezvous (c10d) on the allocation's first node, hydra
# overrides passed through, per-job logs, requeue before the time limit. Submit from the repository root
# (or set MAGI_ROOT): sbatch copies the script elsewhere, so its own path says nothing.
set -euo pipefail

MAGI_ROOT="${MAGI_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$MAGI_ROOT"
if [[ -f "${MAGI_VENV:-$MAGI_ROOT/.venv}/bin/activate" ]]; then
  # shellcheck disable=SC1090,SC1091
  source "${MAGI_VENV:-$MAGI_ROOT/.venv}/bin/activate"
fi

: "${SLURM_JOB_ID:?run under sbatch (SLURM_JOB_ID is not set)}"
: "${SLURM_JOB_NODELIST:?run under sbatch (SLURM_JOB_NODELIST is not set)}"
JOB_NAME="${SLURM_JOB_NAME:-magi}"
LOG_DIR="${MAGI_LOG_DIR:-$MAGI_ROOT/logs}/${JOB_NAME}-${SLURM_JOB_ID}"
mkdir -p "$LOG_DIR"

magi_hostnames() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST"
  else
    python3 "$MAGI_ROOT/slurm/hostlist.py" "$SLURM_JOB_NODELIST"
  fi
}

NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
# GPUs per node: --gpus-per-node=8 sets SLURM_GPUS_ON_NODE (or SLURM_GPUS_PER_NODE, maybe "h100:8")
_gpus="${MAGI_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}}"
GPUS_PER_NODE="${_gpus##*:}"
MASTER_ADDR="$(magi_hostnames | head -n 1)"
MASTER_PORT="${MAGI_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT
# NCCL: fail fast and say why, instead of hanging until the job's time limit
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# torchrun SIGKILLs its workers 30 s after passing on a SIGTERM: too short for a large model's checkpoint.
# Give them most of the --signal=B:USR1@300 warning (the checkpoint is atomic either way, never torn)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"

SRUN_PID=""
_magi_requeue() {
  # --signal=B:USR1@N: the time limit is N seconds away. SIGTERM makes the trainer write its checkpoint
  # (torchrun passes it on); then the job goes back to the queue and resumes from it (resume=auto).
  echo "[magi] $(date -Is) time limit near: stopping for a checkpoint, then requeueing job $SLURM_JOB_ID"
  if [[ -n "$SRUN_PID" ]]; then kill -TERM "$SRUN_PID" 2>/dev/null || true; wait "$SRUN_PID" || true; fi
  scontrol requeue "$SLURM_JOB_ID" || echo "[magi] requeue failed (is the partition allowing --requeue?)"
  exit 0
}
_magi_stop() {
  # preemption or scancel: the tasks got SIGTERM too and checkpoint; Slurm requeues preempted jobs (--requeue)
  echo "[magi] $(date -Is) SIGTERM: waiting for the tasks to checkpoint and exit"
  if [[ -n "$SRUN_PID" ]]; then wait "$SRUN_PID" || true; fi
  exit 143
}

# magi_run MODULE [hydra overrides...]: the torchrun command on every node of the allocation.
magi_run() {
  local module="$1"
  shift
  local cmd=(torchrun
    --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
    --max-restarts=0 --log-dir="$LOG_DIR/torchrun" --tee=3
    -m "$module" "$@")
  echo "[magi] $(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS_PER_NODE GPUs," \
       "rendezvous $MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR"
  printf '[magi] command:'; printf ' %q' "${cmd[@]}"; printf '\n'
  trap _magi_requeue USR1
  trap _magi_stop TERM
  srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
       --output="$LOG_DIR/node-%N.log" "${cmd[@]}" &
  SRUN_PID=$!
  local rc=0
  wait "$SRUN_PID" || rc=$?
  SRUN_PID=""
  return "$rc"
}
