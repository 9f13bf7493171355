"""DeMo's encode and decode in plain torch: the reference every kernel is checked against, and the CPU path.

encode: per chunk, DCT, take the k largest |coefficients|, and remove exactly what is sent from the momentum.
decode: per position, the mean over the replicas that sent it, in replica order 0..R-1 (deterministic), inverse DCT.
"""

from __future__ import annotations

import torch

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import dct2, idct2


def topk_chunks(coeffs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_chunks, s*s) -> (indices (num_chunks, k) int64, values): the k largest |c| of each chunk.

    Exact ties are broken however torch.topk breaks them (deterministically for one input); they are measure-zero
    on real momenta, and the kernels are checked against this set only where magnitudes are distinct.
    """
    flat = coeffs.reshape(coeffs.shape[0], -1)
    idx = flat.abs().topk(k, dim=1, sorted=False).indices
    return idx, torch.gather(flat, 1, idx)


def encode(delta: torch.Tensor, layout: ChunkLayout, k: int, wire_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the top-k DCT coefficients of each chunk of ``delta`` (updated in place to the residual).

    The residual keeps what rounding to ``wire_dtype`` lost, so nothing of the momentum is dropped: the sent
    coefficients are zeroed exactly when the wire dtype is fp32, and left holding their rounding error otherwise.
    Returns (indices int64 (num_chunks, k), values in wire_dtype).
    """
    coeffs = dct2(layout.to_chunks(delta.float())).reshape(layout.num_chunks, -1)
    idx, vals = topk_chunks(coeffs, k)
    sent = vals.to(wire_dtype)
    coeffs.scatter_(1, idx, vals - sent.float())
    delta.copy_(layout.from_chunks(idct2(coeffs.view(-1, layout.s, layout.s))))
    return idx, sent


def decode(indices: list[torch.Tensor], values: list[torch.Tensor], layout: ChunkLayout) -> torch.Tensor:
    """Mean of the replicas' sparse coefficients, position by position over the replicas that sent it -> (rows, cols)."""
    n = layout.num_chunks
    total = torch.zeros(n, layout.s * layout.s, dtype=torch.float32, device=values[0].device)
    count = torch.zeros_like(total)
    for idx, vals in zip(indices, values):  # fixed replica order; indices within a chunk are distinct
        total.scatter_add_(1, idx, vals.float())
        count.scatter_add_(1, idx, torch.ones_like(vals, dtype=torch.float32))
    mean = torch.where(count > 0, total / count.clamp(min=1), total)
    return layout.from_chunks(idct2(mean.view(n, layout.s, layout.s)))
