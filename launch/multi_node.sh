#!/usr/bin/env bash
# One torchrun agent per node, c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NGPU=8 launch/multi_node.sh optim=flexdemo model=1b
# The mesh defaults to replicate = NNODES, shard = NGPU (GPUs per node). Extra arguments are hydra overrides.
# All ranks share one hydra run dir through TORCHELASTIC_RUN_ID (= RUN_ID below): give every node the same RUN_ID.
set -euo pipefail
source "$(dirname "$0")/python.sh"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NGPU=${NGPU:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
RUN_ID=${RUN_ID:-flexmore-$MASTER_ADDR-$MASTER_PORT}
# A dead worker restarts the job (MAX_RESTARTS times), which resumes from its last checkpoint; restarted workers must
# not wait on the agent's old shared store (torch: they hang in init_process_group otherwise).
MAX_RESTARTS=${MAX_RESTARTS:-3}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NGPU" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" --max_restarts="$MAX_RESTARTS" \
  -m flexmore.cli.train "$@"
