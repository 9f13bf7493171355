"""Bytes each rank moves per optimizer step, per process group, by strategy (ring collectives).

Intra-node (shard group, S ranks): FSDP all-gathers parameters for forward (and again for backward when it reshards
after forward) and reduce-scatters gradients: each moves (S - 1) / S of the full tensor per rank.
Inter-node (replicate group, R ranks): HSDP all-reduces each shard's gradient, 2 (R - 1) / R of it; FlexDeMo
all-gathers the packed payloads, R - 1 of them; DeMo (every rank a replica) does the same over the world.
"""

from __future__ import annotations


def comm_per_step(strategy: str, numel: int, replicate: int, shard: int, param_bytes: int, reduce_bytes: int,
                  reshard_after_forward: bool, demo_comm: dict | None = None) -> dict[str, float]:
    R, S = replicate, shard
    out: dict[str, float] = {}
    if strategy == "demo":
        shard_bytes = 0.0
    else:
        gathers = 2 if reshard_after_forward else 1
        shard_bytes = (S - 1) / S * numel * (gathers * param_bytes + reduce_bytes)
    out["comm/shard_sent_bytes"] = shard_bytes
    shard_numel = numel / S if strategy != "demo" else numel
    dense = 2 * (R - 1) / R * shard_numel * 2  # a dense bf16 ring all-reduce of this rank's gradient shard
    if strategy == "adamw":
        out["comm/replicate_sent_bytes"] = 2 * (R - 1) / R * shard_numel * reduce_bytes
    else:
        out["comm/replicate_sent_bytes"] = (demo_comm or {}).get("replicate_sent_bytes", 0.0)
        out["comm/payload_bytes"] = (demo_comm or {}).get("payload_bytes", 0.0)
    out["comm/replicate_recv_bytes"] = out["comm/replicate_sent_bytes"]
    out["comm/dense_bf16_allreduce_bytes"] = dense
    if out["comm/replicate_sent_bytes"] > 0:
        out["comm/compression_vs_dense_bf16"] = dense / out["comm/replicate_sent_bytes"]
    return out
