"""The orthogonal step's Newton-Schulz iteration in torch: for whole matrices (``flexdemo.orthogonal``) and for the
chunks' coefficient tiles (``decode_orthogonal_reference``; the Triton kernel ``decode_orthogonal`` iterates the same
way).

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
