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
BATCH_ELEMENTS = 1 << 27  # equal-shaped matrices stacked per Newton-Schulz batch, up to this many elements (512 MiB fp32)


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


def orthogonalize_chunks(direction: torch.Tensor, layout, precision: str = "fp32") -> torch.Tensor:
    """orthogonal_scope=chunk: each s x s chunk of the local shard's (rows, cols) view on its own (the padding of a
    ragged edge chunk stays zero rows / columns, which the iteration keeps zero): no gather, s x s products only."""
    chunks = orthogonal_step(layout.to_chunks(direction.view(layout.rows, layout.cols)), precision=precision)
    return layout.from_chunks(chunks).reshape(direction.shape)


def orthogonalize(param: torch.Tensor, direction: torch.Tensor, layout=None, scope: str = "matrix",
                  precision: str = "fp32") -> torch.Tensor:
    """The orthogonal step of ``param``'s decoded ``direction`` (shaped like its local shard), as a local shard.
    scope "matrix": a parameter sharded inside the node (an FSDP2 DTensor) has the whole matrix gathered over its
    shard group first, so the step does not depend on how many GPUs share the node; matrices are (shape[0], rest)
    views. scope "chunk": each chunk of ``layout`` on its own (``orthogonalize_chunks``)."""
    if scope == "chunk":
        return orthogonalize_chunks(direction, layout, precision)
    if not is_sharded(param):
        return orthogonal_step(direction.reshape(direction.shape[0], -1), precision=precision).view_as(direction)
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
    """``orthogonalize`` of each (param, direction) in place, the whole matrices of one shape (not sharded inside
    the node) stacked into one batch: a model's many equal-shaped matrices cost a few launches, not one per
    matrix (each matrix of the batch is still orthogonalised on its own, the same numbers as one at a time)."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, d, lay) in enumerate(zip(params, directions, layouts)):
        if scope == "matrix" and not is_sharded(p):
            groups.setdefault((d.shape[0], d.numel() // max(d.shape[0], 1)), []).append(i)
        else:
            d.copy_(orthogonalize(p, d, lay, scope, precision))
    for shape, members in groups.items():
        per_batch = max(1, BATCH_ELEMENTS // (shape[0] * shape[1]))
        for start in range(0, len(members), per_batch):
            batch = members[start : start + per_batch]
            steps = orthogonal_step(torch.stack([directions[i].reshape(shape) for i in batch]), precision=precision)
            for i, step in zip(batch, steps):
                directions[i].copy_(step.view_as(directions[i]))
