"""The sync strategy (the optimizer is the strategy): one object per strategy owns where FSDP shards, who exchanges
what across nodes, the bytes that costs (ring collectives), and whether replicas keep state of their own.

Intra-node (shard group, S ranks): FSDP all-gathers parameters for forward (and again for backward when it reshards
after forward) and reduce-scatters gradients: each moves (S - 1) / S of the full tensor per rank.
Inter-node (replicate group, R ranks): HSDP all-reduces each shard's gradient, 2 (R - 1) / R of it; FlexDeMo
all-gathers the packed payloads, R - 1 of them; DeMo (every rank a replica) does the same over the world.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    every_rank_a_replica: bool  # no sharding: each rank is a replica of its own (DeMo as in the paper)
    dense_sync: bool  # gradients are all-reduced across nodes (HSDP); otherwise FlexDeMo exchanges momenta

    @property
    def per_replica_state(self) -> bool:
        """Replicas keep residual momenta of their own: checkpoints stack them, a resume needs as many replicas."""
        return not self.dense_sync

    def fsdp_mesh(self, ctx):
        """The mesh FSDP shards over: none for DeMo; the 2-D mesh for HSDP unless its all-reduce goes over the slow
        (gloo) group, where FSDP stays inside the node as it does for FlexDeMo; and none where that would be a
        shard group of one rank (nothing to shard), so a run of one rank per node issues no collective from FSDP
        (ranks that share one GPU can then run on gloo alone)."""
        if not ctx.distributed or self.every_rank_a_replica:
            return None
        if self.dense_sync and ctx.slow_replicate is None:
            return ctx.mesh
        return ctx.mesh["shard"] if ctx.shard > 1 else None

    def comm_per_step(self, numel: int, replicate: int, shard: int, param_bytes: int, reduce_bytes: int,
                      reshard_after_forward: bool, demo_comm: dict | None = None) -> dict[str, float]:
        """Bytes one rank sends per step on each group (``comm/*``), with a dense bf16 all-reduce for comparison."""
        R, S = replicate, shard
        out: dict[str, float] = {}
        if self.every_rank_a_replica:
            out["comm/shard_sent_bytes"], shard_numel = 0.0, numel
        else:
            gathers = 2 if reshard_after_forward else 1
            out["comm/shard_sent_bytes"] = (S - 1) / S * numel * (gathers * param_bytes + reduce_bytes)
            shard_numel = numel / S
        dense = 2 * (R - 1) / R * shard_numel * 2  # a dense bf16 ring all-reduce of this rank's gradient shard
        if self.dense_sync:
            out["comm/replicate_sent_bytes"] = 2 * (R - 1) / R * shard_numel * reduce_bytes
        else:
            out["comm/replicate_sent_bytes"] = (demo_comm or {}).get("replicate_sent_bytes", 0.0)
            out["comm/payload_bytes"] = (demo_comm or {}).get("payload_bytes", 0.0)
        out["comm/replicate_recv_bytes"] = out["comm/replicate_sent_bytes"]
        out["comm/dense_bf16_allreduce_bytes"] = dense
        if out["comm/replicate_sent_bytes"] > 0:
            out["comm/compression_vs_dense_bf16"] = dense / out["comm/replicate_sent_bytes"]
        return out


def describe_comm(comm: dict[str, float]) -> str:
    """One line of ``comm_per_step``'s figures for the console."""
    inter, dense = comm.get("comm/replicate_sent_bytes", 0.0), comm.get("comm/dense_bf16_allreduce_bytes", 0.0)
    line = f"across nodes {inter / 1e6:,.3f} MB"
    if inter > 0 and dense > 0:
        line += f" ({dense / inter:,.1f}x less than a dense bf16 all-reduce, {dense / 1e6:,.3f} MB)"
    elif comm.get("comm/payload_bytes"):
        line += f" (one replica: a payload of {comm['comm/payload_bytes'] / 1e6:,.3f} MB would go to each other node)"
    return line + f", inside a node {comm.get('comm/shard_sent_bytes', 0.0) / 1e6:,.3f} MB"


STRATEGIES = {
    "adamw": Strategy("adamw", "HSDP: FSDP inside a node, gradients all-reduced across nodes", False, True),
    "demo": Strategy("demo", "every rank a replica exchanging compressed momenta with all others", True, False),
    "flexdemo": Strategy("flexdemo", "FSDP inside a node, FlexDeMo's compressed momenta across nodes", False, False),
}


def get_strategy(name: str | Strategy) -> Strategy:
    if isinstance(name, Strategy):
        return name
    if name not in STRATEGIES:
        raise ValueError(f"unknown sync strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
