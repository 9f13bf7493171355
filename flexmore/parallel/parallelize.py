"""Apply FSDP2 for a sync strategy, block by block (as torchtitan does), then materialise the weights. Where each
strategy shards is its own (``Strategy.fsdp_mesh``): HSDP on the 2-D mesh, FlexDeMo on the shard sub-mesh (each rank's
``.grad`` is its replica's shard), DeMo not at all."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from flexdemo import local_tensor
from flexdemo.link import LinkCap
from flexmore.model import ModelConfig, build_model
from flexmore.model.transformer import FlexOlmo
from flexmore.parallel.mesh import ParallelContext
from flexmore.parallel.strategy import Strategy, get_strategy


def apply_fsdp(model: FlexOlmo, ctx: ParallelContext, strategy: Strategy, mixed_precision: bool,
               reshard_after_forward: bool = True) -> None:
    mesh = strategy.fsdp_mesh(ctx)  # with HSDP over the slow link, ``allreduce_replicas`` does the replicate part
    if mesh is None:
        return
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def build_parallel_model(cfg: ModelConfig, ctx: ParallelContext, strategy: Strategy | str, seed: int,
                         mixed_precision: bool = False, init_state: dict | None = None,
                         trainable=None, reshard_after_forward: bool = True) -> FlexOlmo:
    """Meta build -> freeze -> shard -> allocate -> weights from one full state dict on rank 0 (``init_state``, or a
    seeded fresh model), so every layout (and a single process) starts from the same numbers. ``trainable(name)``:
    parameters it rejects get requires_grad=False (no gradient, no optimizer state)."""
    if not ctx.distributed:
        model = build_model(cfg, device=ctx.device, seed=seed)
        if init_state is not None:
            model.load_state_dict(init_state)
    else:
        model = build_model(cfg, device="meta")
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
    if not ctx.distributed:
        return model
    apply_fsdp(model, ctx, get_strategy(strategy), mixed_precision, reshard_after_forward)
    model.to_empty(device=ctx.device)
    full = {}
    if ctx.rank == 0:
        full = init_state if init_state is not None else build_model(cfg, device="cpu", seed=seed).state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.init_rope()
    dist.barrier()
    return model


@torch.no_grad()
def allreduce_replicas(params: list[torch.nn.Parameter], group: dist.ProcessGroup, link: LinkCap | None = None) -> None:
    """Average each rank's gradient shard over its replicate group in one flat bucket (through host memory, as the
    gloo group needs): HSDP's inter-node all-reduce, done explicitly over a slow link (capped by ``link``)."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads]).cpu()
    started = time.perf_counter()
    dist.all_reduce(flat, group=group)
    if link is not None:  # a ring all-reduce: 2 (R - 1) messages of 1 / R of the bucket each
        R = dist.get_world_size(group)
        link.hold(2 * (R - 1) / R * flat.numel() * flat.element_size(), 2 * (R - 1), started)
    flat /= dist.get_world_size(group)
    flat = flat.to(grads[0].device)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
