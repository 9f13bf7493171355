"""The 2-D device mesh (replicate = nodes, shard = GPUs per node), from torchrun's environment or the config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelContext:
    world: int
    rank: int
    local_rank: int
    replicate: int
    shard: int
    device: torch.device
    mesh: DeviceMesh | None  # (replicate, shard); None in a single process
    slow_replicate: dist.ProcessGroup | None = None  # this rank's replicate group over gloo (slow-link emulation)

    @property
    def replicate_group(self) -> dist.ProcessGroup | None:
        if self.slow_replicate is not None:
            return self.slow_replicate
        return self.mesh["replicate"].get_group() if self.mesh is not None and self.replicate > 1 else None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None


def resolve_layout(world: int, local_world: int, replicate: int | None, shard: int | None,
                   every_rank_a_replica: bool = False) -> tuple[int, int]:
    """(replicate, shard) with replicate * shard == world and shard dividing a node; errors name the numbers."""
    if every_rank_a_replica:  # DeMo as in the paper: no sharding, every rank exchanges with every other
        if shard not in (None, 1) or replicate not in (None, world):
            raise ValueError(f"optim=demo makes every rank a replica (replicate={world}, shard=1); got "
                             f"parallel.replicate={replicate}, parallel.shard={shard}")
        return world, 1
    for name, v in (("parallel.replicate", replicate), ("parallel.shard", shard)):
        if v is not None and v < 1:
            raise ValueError(f"{name}={v} must be >= 1")
    if shard is None:
        shard = local_world if replicate is None else world // replicate
    if replicate is None:
        replicate = world // shard if shard and world % shard == 0 else 0
    if replicate * shard != world:
        raise ValueError(f"parallel.replicate={replicate} x parallel.shard={shard} = {replicate * shard} does not match "
                         f"the world size {world} (WORLD_SIZE); choose replicate x shard = {world}")
    if local_world % shard != 0:
        raise ValueError(f"parallel.shard={shard} does not divide the {local_world} processes of a node "
                         f"(LOCAL_WORLD_SIZE={local_world}): a shard group must sit inside one node")
    return replicate, shard


def init_parallel(replicate: int | None, shard: int | None, backend: str, device_pref: str,
                  every_rank_a_replica: bool = False, replicate_backend: str = "auto",
                  timeout_s: float = 600.0) -> ParallelContext:
    """Read torchrun's environment, validate the layout, start the process group and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    R, S = resolve_layout(world, local_world, replicate, shard, every_rank_a_replica)
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return ParallelContext(1, 0, 0, 1, 1, device, None)
    # more ranks on this host than GPUs (R "nodes" sharing one): NCCL refuses two ranks on one GPU, gloo does not
    shared = use_cuda and local_world > torch.cuda.device_count()
    if backend == "auto":
        backend = "nccl" if use_cuda and not shared else "gloo"
        if shared and rank == 0:
            print(f"parallel: {local_world} ranks share {torch.cuda.device_count()} GPU(s): the process groups run on "
                  "gloo (parallel.backend=auto)", flush=True)
    if replicate_backend == "auto" and shared and backend == "gloo":
        replicate_backend = "gloo"  # HSDP's all-reduce through host memory too: no FSDP collective on a shared GPU
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"parallel.backend={backend!r}; allowed: auto, nccl, gloo")
    if not dist.is_initialized():
        # device_id binds NCCL to its GPU; a gloo group bound to one has its sub-groups made by split_group, which
        # deep-copies gloo's options and fails (cannot pickle _Options): ranks sharing a GPU run on gloo unbound
        dist.init_process_group(backend=backend, device_id=device if use_cuda and backend == "nccl" else None,
                                timeout=timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device.type, (R, S), mesh_dim_names=("replicate", "shard"))
    slow = None
    if replicate_backend == "gloo" and R > 1:
        # Every rank creates every replicate group (new_group is collective), keeps its own.
        for j in range(S):
            group = dist.new_group([r * S + j for r in range(R)], backend="gloo", timeout=timedelta(seconds=timeout_s))
            if rank % S == j:
                slow = group
    elif replicate_backend != "auto":
        raise ValueError(f"parallel.replicate_backend={replicate_backend!r}; allowed: auto, gloo")
    return ParallelContext(world, rank, local_rank, R, S, device, mesh, slow)
