"""base_step=orthogonal at orthogonal_scope=chunk, decode + orthogonal step + apply, in plain torch: the reference
for ``decode_orthogonal.py``, and the CPU path.

Per chunk: the replicas' mean coefficients M (as ``decode_reference``), the orthogonal step of the whole s x s chunk
of the decoded direction D^T M D (its padding at a ragged edge included: the step is that of the chunk the DCT saw),
cropped to the tensor, then p = p * decay - lr * step. The Newton-Schulz iteration is a polynomial in X X^T times X,
so for D orthonormal NS(D^T M D) = D^T NS(M) D: it runs on M (``newton_schulz_reference.orthogonal_step``), whose
rows and columns that no replica sent into are exactly zero and stay so, in bf16 too. Iterating on the decoded chunk
instead, bf16's rounding fills those directions (a chunk's direction has rank about k, and the iteration grows a
small singular value ~3.4x a round): 17-27% off the fp32 step at k 32 of 64 x 64, against ~3% here.
"""

from __future__ import annotations

import torch

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import idct2
from flexdemo.ops import newton_schulz_reference as ns
from flexdemo.ops.decode_reference import mean_coefficients


def check_precision(precision: str) -> None:
    if precision not in ns.PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(ns.PRECISIONS)}")


def decode_orthogonal_apply_reference(param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                                      layout: ChunkLayout, k: int, lr: float, decay: float, precision: str = "fp32",
                                      mean: str = "senders") -> None:
    check_precision(precision)
    tiles = mean_coefficients(indices, values, layout, k, mean)
    per_batch = max(1, ns.BATCH_ELEMENTS // (layout.s * layout.s))
    steps = torch.cat([ns.orthogonal_step(tiles[i : i + per_batch], precision=precision)
                       for i in range(0, tiles.shape[0], per_batch)]) if tiles.shape[0] else tiles
    param.copy_((param.float() * decay - lr * layout.from_chunks(idct2(steps))).to(param.dtype))
