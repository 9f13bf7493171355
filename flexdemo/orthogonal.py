"""base_step=orthogonal: the decoded direction of each matrix orthogonalised, as Muon does to its momentum.

A sign step moves every element by lr whatever the decoded direction's spectrum; an orthogonalised step moves every
singular direction of the matrix alike, so the few directions that the top-k coefficients carry strongly do not drown
the rest. Scaled to the RMS AdamW's updates typically have, so AdamW's learning rates carry over.
"""

from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz iteration's (a, b, c), as Muon tunes it
NS_STEPS = 5
UPDATE_RMS = 0.2  # AdamW's typical update RMS: the orthogonal factor (RMS 1 / sqrt(max side)) is scaled to it
BATCH_ELEMENTS = 1 << 27  # matrices (or chunks) per Newton-Schulz batch: at most this many elements (512 MiB fp32)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def orthogonal_step(d: torch.Tensor, steps: int = NS_STEPS, precision: str = "fp32") -> torch.Tensor:
    """d (..., rows, cols) -> UPDATE_RMS sqrt(max(rows, cols)) U V^T approximately (d = U S V^T; a batch of matrices
    each on its own), fp32 out: X <- a X + (b A + c A^2) X with A = X X^T, from X = d / |d|_F (normalised in fp32),
    the products in ``precision`` (the quintic iteration pushes every singular value into ~[0.7, 1.2] rather than
    exactly 1, which is all a step direction needs). Deterministic, so replicas agree."""
    a, b, c = NS_COEFFS
    x = d.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)).to(PRECISIONS[precision])
    for _ in range(steps):
        g = x @ x.mT
        x = a * x + (b * g + c * (g @ g)) @ x
    if tall:
        x = x.mT
    return x.float() * (UPDATE_RMS * max(d.shape[-2:]) ** 0.5)


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


def orthogonalize_all(params: list, directions: list[torch.Tensor], layouts: list, scope: str = "matrix",
                      precision: str = "fp32") -> None:
    """The orthogonal step of each (param, direction), in place, in few launches rather than one sequence per tensor:
    scope "matrix": the whole matrices of one shape (not sharded inside the node) stacked into one batch; scope
    "chunk": each s x s chunk of every local shard's ``layouts`` view, all in one batch (no gather; the padding of a
    ragged edge chunk stays zero rows / columns, which the iteration keeps zero). Every matrix is still orthogonalised
    on its own (the numbers of one at a time, to rounding); batches hold at most BATCH_ELEMENTS elements."""
    if scope == "chunk":
        chunked = ((i, lay.to_chunks(d.view(lay.rows, lay.cols)))
                   for i, (d, lay) in enumerate(zip(directions, layouts)))
        for batch in batches(chunked):
            steps = orthogonal_step(torch.cat([c for _, c in batch]), precision=precision)
            for (i, c), step in zip(batch, steps.split([c.shape[0] for _, c in batch])):
                directions[i].copy_(layouts[i].from_chunks(step).reshape(directions[i].shape))
        return
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


def batches(items):
    """Consecutive runs of (index, tensor) pairs holding at most BATCH_ELEMENTS elements (at least one pair each)."""
    batch, size = [], 0
    for item in items:
        if batch and size + item[1].numel() > BATCH_ELEMENTS:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[1].numel()
    if batch:
        yield batch
