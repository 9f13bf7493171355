#!/usr/bin/env bash
# Emulate two nodes on one CPU machine: two torchrun agents (--nnodes=2) on 127.0.0.1, NPROC_PER_NODE processes each,
# gloo. Extra arguments are hydra overrides, e.g.
#   launch/two_agents_cpu.sh experiment=smoke optim=flexdemo optim.demo.chunk=16
set -euo pipefail
source "$(dirname "$0")/python.sh"
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
PORT=${MASTER_PORT:-$((20000 + RANDOM % 20000))}
RUN_ID=${RUN_ID:-two-agents-$$}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Restarted workers must not wait on the agent's old shared store (torch: they hang in init_process_group otherwise)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
MAX_RESTARTS=${MAX_RESTARTS:-0}  # > 0: a dead worker restarts the job, which resumes from its last checkpoint
pids=()
for node in 0 1; do
  "$PY" -m torch.distributed.run --nnodes=2 --node_rank=$node --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:$PORT --rdzv_id="$RUN_ID" --max_restarts="$MAX_RESTARTS" \
    -m flexmore.cli.train train.device=cpu "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
