"""Fused decode + apply as one Triton kernel: one program per s x s chunk, one pass over the parameter.

The replicas' sparse coefficients become a dense tile by one-hot matmuls, (A * v)^T B with A, B the one-hot rows and
columns of the k indices (exact on tensor cores for bf16/fp16 values), summed replica by replica in order 0..R-1
(the same bits on every replica), divided by the per-position count, inverse DCT, optional sign, then
p = p * decay - lr * update, stored in p's dtype (fp32 or bf16). The torch twin is ``decode_reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import dct_matrix
from flexdemo.ops.rounding import cast_like

PRECISION = "tf32x3"  # defaults, the fastest on an H100 (benchmarks/README.md); ~fp32 accuracy on tensor cores
NUM_WARPS = 4  # 8 is slower with tf32x3 (benchmarks/README.md)


@triton.jit
def _decode_kernel(p_ptr, idx_ptr, vals_ptr, d_ptr, rows, cols, stride_p, grid_cols, idx_rstride, val_rstride, lr,
                   decay, R: tl.constexpr, S: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, SIGN: tl.constexpr,
                   PRECISION: tl.constexpr, ONEHOT_PRECISION: tl.constexpr):
    c = tl.program_id(0)
    gi = c // grid_cols
    gj = c % grid_cols
    si = tl.arange(0, S)
    kk = tl.arange(0, KP)
    live = kk < K
    total = tl.zeros((S, S), dtype=tl.float32)
    count = tl.zeros((S, S), dtype=tl.float32)
    for rep in range(R):
        idx = tl.load(idx_ptr + rep * idx_rstride + c * K + kk, mask=live, other=0)
        val = tl.load(vals_ptr + rep * val_rstride + c * K + kk, mask=live, other=0.0).to(tl.float32)
        row = tl.where(live, idx // S, -1)
        col = tl.where(live, idx % S, -1)
        a = tl.where(row[:, None] == si[None, :], 1.0, 0.0)
        b = tl.where(col[:, None] == si[None, :], 1.0, 0.0)
        total += tl.dot(tl.trans(a * val[:, None]), b, input_precision=ONEHOT_PRECISION)
        count += tl.dot(tl.trans(a), b, input_precision="tf32")  # 0/1 products, one term per position: exact
    mean = tl.where(count > 0, total / tl.maximum(count, 1.0), 0.0)
    d = tl.load(d_ptr + si[:, None] * S + si[None, :])
    upd = tl.dot(tl.dot(tl.trans(d), mean, input_precision=PRECISION), d, input_precision=PRECISION)
    if SIGN:
        upd = tl.where(upd > 0, 1.0, tl.where(upd < 0, -1.0, 0.0))
    r = gi * S + si[:, None]
    q = gj * S + si[None, :]
    mask = (r < rows) & (q < cols)
    p = tl.load(p_ptr + r * stride_p + q, mask=mask, other=0.0).to(tl.float32)
    p = p * decay - lr * upd
    tl.store(p_ptr + r * stride_p + q, cast_like(p, p_ptr), mask=mask)


def decode_apply_triton(param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, layout: ChunkLayout,
                        k: int, lr: float, decay: float, sign: bool, precision: str | None = None,
                        num_warps: int | None = None) -> None:
    """Same contract as ``decode_apply_reference``; ``indices`` int32 (R, num_chunks * k), rows may be strided.
    precision / num_warps: None = the module's defaults (read at call time, so a benchmark can set them)."""
    precision, num_warps = precision or PRECISION, num_warps or NUM_WARPS
    # A one-hot product picks one value per position, so it is exact on tensor cores (tf32: 10-bit mantissa) whenever
    # the values fit in tf32 (bf16, fp16); fp32 values need ieee.
    onehot = "tf32" if values.dtype in (torch.bfloat16, torch.float16) else "ieee"
    if layout.num_chunks == 0:
        return
    s = layout.s
    d = dct_matrix(s, param.device, torch.float32)
    kp = max(16, triton.next_power_of_2(k))  # tl.dot needs >= 16 along the reduced dim; extra rows are masked
    _decode_kernel[(layout.num_chunks,)](
        param, indices, values, d, layout.rows, layout.cols, param.stride(0), layout.grid[1], indices.stride(0),
        values.stride(0), float(lr), float(decay), R=indices.shape[0], S=s, K=k, KP=kp, SIGN=sign,
        PRECISION=precision, ONEHOT_PRECISION=onehot, num_warps=num_warps,
    )
