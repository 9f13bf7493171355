"""FlexDeMo's residual momenta for DCP: one tensor per parameter, stacked over replicas.

Replicas' residuals differ (each keeps what it did not send), so a plain save would keep one replica's copy. Here
each parameter's residual becomes a DTensor of shape (replicas, *param.shape) placed Shard(0) over the replicate mesh
dim and Shard(1) over the shard dim: DCP saves every replica's piece and reshards them on load, so a run can resume
with another shard degree (the number of replicas must stay the same).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from flexdemo import FlexDeMo
from flexmore.parallel.mesh import ParallelContext


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def residual_state(opt: FlexDeMo, model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Views (not copies) of the residuals, so DCP load writes straight into the optimizer's state."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p in opt.params:
        delta = opt.state[p]["delta"].unsqueeze(0)
        if ctx.mesh is None:
            out[names[id(p)]] = delta
            continue
        shape = (ctx.replicate, *p.shape)
        out[names[id(p)]] = DTensor.from_local(delta, ctx.mesh, [Shard(0), Shard(1)], run_check=False, shape=shape,
                                               stride=_contiguous_stride(shape))
    return out
