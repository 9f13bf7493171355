#!/usr/bin/env bash
# One node: NGPU processes (default: 1) under torchrun. Extra arguments are hydra overrides, e.g.
#   NGPU=1 launch/single_node.sh experiment=small_public train.steps=500
set -euo pipefail
source "$(dirname "$0")/python.sh"
NGPU=${NGPU:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m flexmore.cli.train "$@"
