"""Fused encode as one Triton kernel: one program per s x s chunk, one pass over the gradient and the momentum.

momentum update -> 2-D DCT (two small matmuls) -> top-k of |C| (ties: lowest index), either by bisecting the k-th
largest magnitude's bits (31 counts, then one compaction) or by k rounds of max-and-mask -> payload (values in the wire
dtype, int32 chunk-local indices) -> residual (sent coefficients zeroed but for their
rounding error) -> inverse DCT -> momentum written back. Bytes moved per element: read grad, read + write momentum.
The torch twin is ``encode_reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import dct_matrix
from flexdemo.ops.rounding import cast_like

TOPK_METHODS = ("bisect", "maxmask")
TOPK = "bisect"  # defaults, the fastest variants on an H100 (benchmarks/README.md)
PRECISION = "tf32x3"  # ~fp32 accuracy on tensor cores; ieee (CUDA-core fp32) is 2.5-5x slower
NUM_WARPS = 4  # 8 is slower with tf32x3 (benchmarks/README.md)


@triton.jit
def _exclusive_rank(x):
    """Per element of an (S, S) int32 tile: the sum of x over the elements before it in row-major order."""
    row_incl = tl.cumsum(x, axis=1)
    row_tot = tl.sum(x, axis=1)
    row_start = tl.cumsum(row_tot, axis=0) - row_tot
    return row_start[:, None] + row_incl - x


@triton.jit
def _encode_kernel(g_ptr, m_ptr, d_ptr, vals_ptr, idx_ptr, rows, cols, stride_g, stride_m, grid_cols, beta, lr,
                   HAS_GRAD: tl.constexpr, S: tl.constexpr, K: tl.constexpr, PRECISION: tl.constexpr,
                   BISECT: tl.constexpr):
    c = tl.program_id(0)
    gi = c // grid_cols
    gj = c % grid_cols
    si = tl.arange(0, S)
    r = gi * S + si[:, None]
    q = gj * S + si[None, :]
    mask = (r < rows) & (q < cols)
    m = tl.load(m_ptr + r * stride_m + q, mask=mask, other=0.0)
    if HAS_GRAD:
        g = tl.load(g_ptr + r * stride_g + q, mask=mask, other=0.0).to(tl.float32)
        m = beta * m + lr * g
    else:
        m = beta * m
    d = tl.load(d_ptr + si[:, None] * S + si[None, :])
    coef = tl.dot(tl.dot(d, m, input_precision=PRECISION), tl.trans(d), input_precision=PRECISION)
    offs = si[:, None] * S + si[None, :]
    mag = tl.abs(coef)
    if BISECT:
        # |c| >= 0, so its fp32 bits order like the values: find the k-th largest bit pattern t one bit at a time
        # (31 counts), then take everything above t and the lowest-index ties at t, compacted in index order.
        bits = mag.to(tl.int32, bitcast=True)
        t = tl.zeros((), dtype=tl.int32)
        for b in range(31):
            cand = t | (1 << (30 - b))
            cnt = tl.sum(tl.sum((bits >= cand).to(tl.int32), axis=1), axis=0)
            t = tl.where(cnt >= K, cand, t)
        above = bits > t
        tie = (bits == t).to(tl.int32)
        need = K - tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)
        take = above | ((tie == 1) & (_exclusive_rank(tie) < need))
        slot = _exclusive_rank(take.to(tl.int32))
        sent = cast_like(coef, vals_ptr)
        tl.store(vals_ptr + c * K + slot, sent, mask=take)
        tl.store(idx_ptr + c * K + slot, offs, mask=take)
        coef = tl.where(take, coef - sent.to(tl.float32), coef)
    else:
        # k rounds of max-and-mask (ties: lowest index), payload in descending magnitude
        for j in range(K):
            top = tl.max(tl.max(mag, axis=1), axis=0)
            pos = tl.min(tl.min(tl.where(mag == top, offs, S * S), axis=1), axis=0)
            hit = offs == pos
            v = tl.sum(tl.sum(tl.where(hit, coef, 0.0), axis=1), axis=0)
            sent = cast_like(v, vals_ptr)
            tl.store(vals_ptr + c * K + j, sent)
            tl.store(idx_ptr + c * K + j, pos)
            coef = tl.where(hit, v - sent.to(tl.float32), coef)
            mag = tl.where(hit, -1.0, mag)
    m_new = tl.dot(tl.dot(tl.trans(d), coef, input_precision=PRECISION), d, input_precision=PRECISION)
    tl.store(m_ptr + r * stride_m + q, m_new, mask=mask)


def encode_triton(grad: torch.Tensor | None, delta: torch.Tensor, layout: ChunkLayout, beta: float, lr: float,
                  k: int, out_vals: torch.Tensor, out_idx: torch.Tensor, precision: str | None = None,
                  topk: str | None = None, num_warps: int | None = None) -> None:
    """Same contract as ``encode_reference``; ``out_idx`` is int32. ``topk``: one of TOPK_METHODS; None = the module's
    defaults (read at call time, so a benchmark can set them)."""
    precision, topk, num_warps = precision or PRECISION, topk or TOPK, num_warps or NUM_WARPS
    if topk not in TOPK_METHODS:
        raise ValueError(f"topk={topk!r}; allowed: {', '.join(TOPK_METHODS)}")
    if layout.num_chunks == 0:
        return
    s = layout.s
    d = dct_matrix(s, delta.device, torch.float32)
    g = grad if grad is not None else delta
    _encode_kernel[(layout.num_chunks,)](
        g, delta, d, out_vals, out_idx, layout.rows, layout.cols, g.stride(0), delta.stride(0), layout.grid[1],
        float(beta), float(lr), HAS_GRAD=grad is not None, S=s, K=k, PRECISION=precision, BISECT=topk == "bisect",
        num_warps=num_warps,
    )
