"""Fused decode + apply, in plain torch: the reference for the Triton kernel, and the CPU path.

Per position, the mean of the coefficients over the replicas that sent it (DeMo), or over all R replicas (``mean``
"all": a position one replica sent counts 1/R of one that all sent), summed in replica order 0..R-1, so every
replica computes the same bits; inverse DCT, optional sign, then p = p * decay - lr * update in one rounding.
"""

from __future__ import annotations

import torch

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import idct2

REPLICA_MEANS = ("senders", "all")


def mean_over_all(mean: str) -> bool:
    """Whether ``mean`` divides by all replicas (checked: one of REPLICA_MEANS)."""
    if mean not in REPLICA_MEANS:
        raise ValueError(f"mean={mean!r}; allowed: {', '.join(REPLICA_MEANS)}")
    return mean == "all"


def decode_mean(indices: torch.Tensor, values: torch.Tensor, layout: ChunkLayout, k: int,
                mean: str = "senders", coefficient_sign: bool = False) -> torch.Tensor:
    """indices (R, num_chunks * k) int, values (R, num_chunks * k) -> the decoded update (rows, cols) fp32; with
    ``coefficient_sign`` of the mean coefficients' signs."""
    tiles = mean_coefficients(indices, values, layout, k, mean)
    return layout.from_chunks(idct2(tiles.sign() if coefficient_sign else tiles))


def mean_coefficients(indices: torch.Tensor, values: torch.Tensor, layout: ChunkLayout, k: int,
                      mean: str = "senders") -> torch.Tensor:
    """The replicas' mean coefficient tile of every chunk, (num_chunks, s, s) fp32."""
    over_all = mean_over_all(mean)
    n = layout.num_chunks
    total = torch.zeros(n, layout.s * layout.s, dtype=torch.float32, device=values.device)
    count = torch.zeros_like(total)
    for r in range(indices.shape[0]):  # fixed replica order; indices within a chunk are distinct
        idx = indices[r].view(n, k).long()
        total.scatter_add_(1, idx, values[r].view(n, k).float())
        count.scatter_add_(1, idx, torch.ones(n, k, dtype=torch.float32, device=values.device))
    if over_all:
        avg = total / indices.shape[0]
    else:
        avg = torch.where(count > 0, total / count.clamp(min=1), total)
    return avg.view(n, layout.s, layout.s)


def decode_apply_reference(param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, layout: ChunkLayout,
                           k: int, lr: float, decay: float, sign: bool, mean: str = "senders",
                           coefficient_sign: bool = False) -> None:
    update = decode_mean(indices, values, layout, k, mean, coefficient_sign)
    if sign:
        update = update.sign()
    param.copy_((param.float() * decay - lr * update).to(param.dtype))
