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


# the residual, the base step's moments (adam, lion) or the dense-sent tensors' (dense_step=adam; the same on every
# replica), and tensor_scale's moments of the local gradient (each replica its own, like the residual)
STATES = ("delta", "exp_avg", "exp_avg_sq", "grad_avg", "grad_avg_sq")


def residual_state(opt: FlexDeMo, model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Views (not copies) of the residuals (key: the parameter's name) and of any Adam moments (name:exp_avg, ...),
    so DCP load writes straight into the optimizer's state."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p in opt.params:
        for key in STATES:
            if key not in opt.state[p]:
                continue
            name = names[id(p)] if key == "delta" else f"{names[id(p)]}:{key}"
            local = opt.state[p][key].unsqueeze(0)
            if ctx.mesh is None:
                out[name] = local
                continue
            shape = (ctx.replicate, *p.shape)
            out[name] = DTensor.from_local(local, ctx.mesh, [Shard(0), Shard(1)], run_check=False, shape=shape,
                                           stride=_contiguous_stride(shape))
    return out
