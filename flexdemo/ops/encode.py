"""Fused encode as one Triton kernel: one program per s x s chunk, one pass over the gradient and the momentum.

momentum update -> 2-D DCT (two small matmuls) -> top-k of |C| (ties: lowest index), either by searching the k-th
largest magnitude's fp32 bits two at a time (stopping as soon as exactly k are above the bound) or by k rounds of
max-and-mask -> payload (values in the wire dtype, int32 chunk-local indices) -> momentum minus the inverse DCT of
what was sent (rank-k products of gathered basis rows, read back from the payload: a quarter of a dense inverse at
k = 32 of 64 x 64, and the rest of the momentum never goes through a transform) -> momentum written back.
Bytes moved per element: read grad, read + write momentum. The torch twin is ``encode_reference.py``.
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
def _kth_largest_bound(bits, K: tl.constexpr):
    """A bit pattern t with count(bits >= t) >= K and count(bits > t) < K: the k-th largest, or any t that splits
    off exactly K. Two bits per round: the counts at the three candidates are packed into one int64 sum (16 bits
    each, enough for s <= 128), so 16 rounds at most, one reduction each, and fewer once a count is exactly K."""
    cnt = tl.sum((bits >= (1 << 30)).to(tl.int32))  # bit 30 alone (bit 31, the sign, is 0 for |c|)
    t = tl.where(cnt >= K, 1 << 30, 0)
    n_t = tl.where(cnt >= K, cnt, 1 << 30)  # count at t; unknown (but >= K) when t = 0: never == K by accident
    sh = tl.full((), 28, tl.int32)
    while (sh >= 0) & (n_t != K):
        c1 = t | (1 << sh)
        c2 = t | (2 << sh)
        c3 = t | (3 << sh)
        packed = tl.sum((bits >= c1).to(tl.int64) + ((bits >= c2).to(tl.int64) << 16) + ((bits >= c3).to(tl.int64) << 32))
        n1 = (packed & 0xFFFF).to(tl.int32)
        n2 = ((packed >> 16) & 0xFFFF).to(tl.int32)
        n3 = (packed >> 32).to(tl.int32)
        t_new = tl.where(n3 >= K, c3, tl.where(n2 >= K, c2, tl.where(n1 >= K, c1, t)))
        n_t = tl.where(n3 >= K, n3, tl.where(n2 >= K, n2, tl.where(n1 >= K, n1, n_t)))
        t = t_new
        sh -= 2
    return t


@triton.jit
def _encode_kernel(g_ptr, m_ptr, d_ptr, vals_ptr, idx_ptr, rows, cols, stride_g, stride_m, grid_cols, beta, lr,
                   HAS_GRAD: tl.constexpr, S: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
                   PRECISION: tl.constexpr, FWD_PRECISION: tl.constexpr, BISECT: tl.constexpr):
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
    coef = tl.dot(tl.dot(d, m, input_precision=FWD_PRECISION), tl.trans(d), input_precision=FWD_PRECISION)
    offs = si[:, None] * S + si[None, :]
    mag = tl.abs(coef)
    if BISECT:
        # |c| >= 0, so its fp32 bits order like the values: take everything above the bound and the lowest-index
        # ties at it, compacted in index order.
        bits = mag.to(tl.int32, bitcast=True)
        t = _kth_largest_bound(bits, K)
        above = bits > t
        tie = bits == t
        need = K - tl.sum(above.to(tl.int32))
        if tl.sum(tie.to(tl.int32)) > need:  # more ties than room: the lowest indices first
            take = above | (tie & (_exclusive_rank(tie.to(tl.int32)) < need))
        else:
            take = above | tie
        slot = _exclusive_rank(take.to(tl.int32))
        tl.store(vals_ptr + c * K + slot, cast_like(coef, vals_ptr), mask=take)
        tl.store(idx_ptr + c * K + slot, offs, mask=take)
    else:
        # k rounds of max-and-mask (ties: lowest index), payload in descending magnitude
        for j in range(K):
            top = tl.max(mag)
            pos = tl.min(tl.where(mag == top, offs, S * S))
            hit = offs == pos
            v = tl.sum(tl.where(hit, coef, 0.0))
            tl.store(vals_ptr + c * K + j, cast_like(v, vals_ptr))
            tl.store(idx_ptr + c * K + j, pos)
            mag = tl.where(hit, -1.0, mag)
    # m -= D^T Y D for Y the sent coefficients: sum over the payload of value * outer(D[row], D[col]), read back from
    # what this program just stored (the barrier makes those stores visible to every thread of the program).
    tl.debug_barrier()
    kk = tl.arange(0, KB)
    for j in range(0, K, KB):
        live = (j + kk) < K
        pi = tl.load(idx_ptr + c * K + j + kk, mask=live, other=0)
        pv = tl.load(vals_ptr + c * K + j + kk, mask=live, other=0.0).to(tl.float32)
        a = tl.load(d_ptr + (pi // S)[:, None] * S + si[None, :]) * pv[:, None]
        b = tl.load(d_ptr + (pi % S)[:, None] * S + si[None, :])
        m = tl.dot(tl.trans(-a), b, acc=m, input_precision=PRECISION)
    tl.store(m_ptr + r * stride_m + q, m, mask=mask)


def encode_triton(grad: torch.Tensor | None, delta: torch.Tensor, layout: ChunkLayout, beta: float, lr: float,
                  k: int, out_vals: torch.Tensor, out_idx: torch.Tensor, precision: str | None = None,
                  topk: str | None = None, num_warps: int | None = None, forward_precision: str | None = None) -> None:
    """Same contract as ``encode_reference``; ``out_idx`` is int32. ``topk``: one of TOPK_METHODS; None = the module's
    defaults (read at call time, so a benchmark can set them). ``forward_precision`` (default: ``precision``) is the
    forward DCT's alone: it decides only which coefficients are chosen and their values, never the momentum's
    consistency, since the momentum loses exactly what was sent (the subtraction runs in ``precision``)."""
    precision, topk, num_warps = precision or PRECISION, topk or TOPK, num_warps or NUM_WARPS
    forward_precision = forward_precision or precision
    if topk not in TOPK_METHODS:
        raise ValueError(f"topk={topk!r}; allowed: {', '.join(TOPK_METHODS)}")
    if layout.num_chunks == 0:
        return
    s = layout.s
    d = dct_matrix(s, delta.device, torch.float32)
    g = grad if grad is not None else delta
    _encode_kernel[(layout.num_chunks,)](
        g, delta, d, out_vals, out_idx, layout.rows, layout.cols, g.stride(0), delta.stride(0), layout.grid[1],
        float(beta), float(lr), HAS_GRAD=grad is not None, S=s, K=k, KB=payload_block(k, s), PRECISION=precision,
        FWD_PRECISION=forward_precision, BISECT=topk == "bisect", num_warps=num_warps,
    )


def payload_block(k: int, s: int) -> int:
    """Payload entries per rank-KB product: all k at once up to s (one tl.dot), else s at a time (tl.dot: >= 16)."""
    return max(16, min(triton.next_power_of_2(k), s))
