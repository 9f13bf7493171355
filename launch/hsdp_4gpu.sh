#!/usr/bin/env bash
# The 4-GPU comparison (issue: 2 "nodes" x 2 GPUs on one host): HSDP AdamW vs FlexDeMo (Triton kernels), same global
# batch and steps, at full NVLink speed and with the inter-node traffic over gloo/TCP (a slow-link emulation).
# Results: one JSON per run in $OUT (default outputs/hsdp). MODEL=base STEPS=30 MB=8 SEQ=1024 by default.
set -euo pipefail
source "$(dirname "$0")/python.sh"
OUT=${OUT:-outputs/hsdp}
MODEL=${MODEL:-base}; STEPS=${STEPS:-30}; MB=${MB:-8}; SEQ=${SEQ:-1024}; NPROC=${NPROC:-4}
REPLICATE=${REPLICATE:-2}; SHARD=${SHARD:-2}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
mkdir -p "$OUT"
for strategy in adamw flexdemo; do
  for link in fast slow; do
    flag=""; [ "$link" = slow ] && flag="--slow-link"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$(dirname "$0")/../benchmarks/bench_hsdp.py" \
      --strategy "$strategy" --model "$MODEL" --replicate "$REPLICATE" --shard "$SHARD" --steps "$STEPS" \
      --micro-batch "$MB" --seq-len "$SEQ" $flag --out "$OUT/${strategy}_${link}.json"
  done
done
