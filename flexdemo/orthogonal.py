"""base_step=orthogonal: the decoded direction of each matrix orthogonalised, as Muon does to its momentum (the
iteration: ``flexdemo.ops.newton_schulz_reference``; per chunk, decode, step and apply in one pass:
``flexdemo.ops.decode_orthogonal``)."""

from __future__ import annotations

import torch

from flexdemo.ops.newton_schulz_reference import (  # noqa: F401  (re-exported: the step's constants and iteration)
    NS_COEFFS,
    NS_STEPS,
    UPDATE_RMS,
    batches,
    orthogonal_step,
)


def orthogonalize_sharded(param: torch.Tensor, direction: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """The whole-matrix orthogonal step of a parameter sharded inside the node (an FSDP2 DTensor), from its decoded
    local ``direction``, as a local shard: the whole matrix is gathered over the shard group first, so the step does
    not depend on how many GPUs share the node; matrices are (shape[0], rest) views."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = param.device_mesh
    whole = DTensor.from_local(direction, mesh, param.placements, shape=param.shape, stride=param.stride())
    full = whole.full_tensor()
    step = orthogonal_step(full.reshape(full.shape[0], -1), precision=precision).view_as(full)
    return DTensor.from_local(step, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
        mesh, param.placements).to_local()


def is_sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "device_mesh") and any(pl.is_shard() for pl in param.placements)


def orthogonalize_all(params: list, directions: list[torch.Tensor], precision: str = "fp32") -> None:
    """The whole-matrix orthogonal step of each (param, direction), in place, in few launches rather than one
    sequence per tensor: the matrices of one shape (not sharded inside the node) stacked into one batch, each still
    orthogonalised on its own (the numbers of one at a time, to rounding); batches hold at most BATCH_ELEMENTS
    elements. Per chunk: ``flexdemo.ops.decode_orthogonal_table``."""
    groups: dict[tuple, list] = {}
    for i, (p, d) in enumerate(zip(params, directions)):
        if is_sharded(p):
            d.copy_(orthogonalize_sharded(p, d, precision))
        else:
            shape = (d.shape[0], d.numel() // max(d.shape[0], 1))
            groups.setdefault(shape, []).append((i, d.reshape(shape)))
    for members in groups.values():
        for batch in batches(members):
            steps = orthogonal_step(torch.stack([x for _, x in batch]), precision=precision)
            for (i, _), step in zip(batch, steps):
                directions[i].copy_(step.view_as(directions[i]))
