"""base_step=orthogonal at orthogonal_scope=chunk as one Triton kernel: decode, the chunk's orthogonal step and the
apply in one pass over the parameter, one program per s x s chunk. The torch twin is
``decode_orthogonal_reference.py``.

The Newton-Schulz iteration is a polynomial in X X^T times X, so for the decoded chunk X = D^T M D (D orthonormal)
it equals D^T NS(M) D: the iteration can run on the coefficient tile M instead. M holds at most R k nonzeros, in a
few rows and columns; moved together (rows and columns renumbered by rank, a permutation, under which the iteration
commutes too) they form a CB x CB block, CB = the power of two >= R k (32 at k 32 and one replica, at most s), the
rest of M zero, which the iteration keeps zero. So the iteration's products are CB^3 instead of s^3 (8x fewer at
k 32 of 64 x 64), and the step reaches the parameter as D_r^T Z D_c, with D_r, D_c the basis rows of the block's rows
and columns. The block is built exactly (one-hot products in fp32); the iteration's products are tf32x3 (fp32) or
bf16 with the iterate rounded to bf16 (``precision``, as the twin's bf16 tensors round); the step's two products
tf32x3. The same launch on every replica gives the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdemo.dct import dct_matrix
from flexdemo.ops.chunk_table import ChunkTable
from flexdemo.ops.decode import sender_count
from flexdemo.ops.decode_orthogonal_reference import check_precision
from flexdemo.ops.decode_reference import mean_over_all
from flexdemo.ops.encode import payload_block
from flexdemo.ops.newton_schulz_reference import NS_COEFFS, NS_STEPS, UPDATE_RMS
from flexdemo.ops.rounding import INTERPRETING, cast_like, round_to_bf16
from flexdemo.ops.table_lookup import table_chunk


@triton.jit
def _bf16(x, BF16: tl.constexpr):
    """x rounded to bf16 (kept in fp32 registers) when BF16, else x."""
    if BF16:
        return round_to_bf16(x)
    return x


@triton.jit
def _dot(x, y, BF16: tl.constexpr):
    """x @ y accumulated in fp32: bf16 operands (already bf16 values) or fp32 ones (tf32x3 on the GPU). The
    interpreter's bf16 dot is wrong, so there the same bf16 values multiply in fp32, which is exact per product."""
    if INTERPRETING:
        return tl.dot(x, y, input_precision="ieee")
    if BF16:
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    return tl.dot(x, y, input_precision="tf32x3")


@triton.jit
def _entries(idx_ptr, vals_ptr, rep, j, c, idx_rstride, val_rstride, K: tl.constexpr, KB: tl.constexpr):
    """Replica rep's payload entries j .. j + KB of chunk c: (live, index, value); dead lanes index -1."""
    kk = tl.arange(0, KB)
    live = (j + kk) < K
    idx = tl.load(idx_ptr + rep * idx_rstride + c * K + j + kk, mask=live, other=-1)
    val = tl.load(vals_ptr + rep * val_rstride + c * K + j + kk, mask=live, other=0.0).to(tl.float32)
    return live, idx, val


@triton.jit
def _decode_orthogonal_kernel(p_ptr, idx_ptr, vals_ptr, d_ptr, table_ptr, addr_ptr, owner_ptr, idx_rstride,
                              val_rstride, lr, decay, ns_a, ns_b, ns_c, scale, R: tl.constexpr, S: tl.constexpr,
                              K: tl.constexpr, KB: tl.constexpr, CB: tl.constexpr, STEPS: tl.constexpr,
                              BF16: tl.constexpr, MEAN_ALL: tl.constexpr):
    t, n_rows, n_cols, gc, local, c = table_chunk(tl.program_id(0), owner_ptr, table_ptr)
    pp = tl.load(addr_ptr + t * 2).to(p_ptr.dtype)
    sp = tl.load(addr_ptr + t * 2 + 1).to(tl.int32)
    si = tl.arange(0, S)
    cb = tl.arange(0, CB)
    # which rows and columns of the coefficient tile any replica sent into
    has_r = tl.zeros((S,), tl.int32)
    has_c = tl.zeros((S,), tl.int32)
    for rep in tl.static_range(R):
        for j in range(0, K, KB):
            live, idx, val = _entries(idx_ptr, vals_ptr, rep, j, c, idx_rstride, val_rstride, K, KB)
            row = tl.where(live, idx // S, -1)
            col = tl.where(live, idx % S, -1)
            has_r = tl.maximum(has_r, tl.max((row[:, None] == si[None, :]).to(tl.int32), axis=0))
            has_c = tl.maximum(has_c, tl.max((col[:, None] == si[None, :]).to(tl.int32), axis=0))
    rank_r = tl.cumsum(has_r, axis=0) - 1  # a sent row's place in the block
    rank_c = tl.cumsum(has_c, axis=0) - 1
    # the block M_b (CB x CB): M's sent rows and columns, in order; each entry weighs value / its senders
    m = tl.zeros((CB, CB), tl.float32)
    for rep in tl.static_range(R):
        for j in range(0, K, KB):
            live, idx, val = _entries(idx_ptr, vals_ptr, rep, j, c, idx_rstride, val_rstride, K, KB)
            if MEAN_ALL:
                w = tl.div_rn(val, tl.full((KB,), R, tl.float32))
            else:
                w = tl.div_rn(val, sender_count(idx, idx_ptr, rep, c, idx_rstride, R, K, KB))
            at_r = tl.sum(tl.where((idx // S)[:, None] == si[None, :], rank_r[None, :], 0), axis=1)
            at_c = tl.sum(tl.where((idx % S)[:, None] == si[None, :], rank_c[None, :], 0), axis=1)
            a = tl.where(live[:, None] & (at_r[:, None] == cb[None, :]), w[:, None], 0.0)  # KB x CB
            b = tl.where(live[:, None] & (at_c[:, None] == cb[None, :]), 1.0, 0.0)
            m = tl.dot(tl.trans(a), b, acc=m, input_precision="ieee")  # one nonzero term per element: exact
    # the quintic Newton-Schulz iteration on the block, from M_b / |M_b|_F
    x = _bf16(m / (tl.sqrt(tl.sum(tl.sum(m * m, axis=1), axis=0)) + 1e-7), BF16)
    for _ in tl.static_range(STEPS):  # X <- a X + (b A + c A^2) X, A = X X^T
        g = _bf16(_dot(x, tl.trans(x), BF16), BF16)
        h = _bf16(ns_b * g + ns_c * _bf16(_dot(g, g, BF16), BF16), BF16)
        x = _bf16(ns_a * x + _bf16(_dot(h, x, BF16), BF16), BF16)
    # the step D_r^T Z D_c: basis rows of the block's rows and columns (past the last, row 0 of D: times zero)
    row_of = tl.sum(tl.where((rank_r[None, :] == cb[:, None]) & (has_r[None, :] != 0), si[None, :], 0), axis=1)
    col_of = tl.sum(tl.where((rank_c[None, :] == cb[:, None]) & (has_c[None, :] != 0), si[None, :], 0), axis=1)
    d_r = tl.load(d_ptr + row_of[:, None] * S + si[None, :])  # CB x S
    d_c = tl.load(d_ptr + col_of[:, None] * S + si[None, :])
    upd = _dot(tl.trans(d_r), _dot(x * scale, d_c, False), False)
    r = (local // gc) * S + si[:, None]
    q = (local % gc) * S + si[None, :]
    mask = (r < n_rows) & (q < n_cols)
    p = tl.load(pp + r * sp + q, mask=mask, other=0.0).to(tl.float32)
    tl.store(pp + r * sp + q, cast_like(p * decay - lr * upd, p_ptr), mask=mask)


def block_size(replicas: int, k: int, s: int) -> int:
    """The iteration's block: room for every row (and column) the R k entries can name, a power of two >= 16."""
    return min(s, max(16, triton.next_power_of_2(replicas * k)))


def decode_orthogonal_apply_triton_table(table: ChunkTable, params: list[torch.Tensor], indices: torch.Tensor,
                                         values: torch.Tensor, lr: float, decay: float, precision: str = "fp32",
                                         mean: str = "senders") -> None:
    """Every tensor of ``table``: params[t] (rows, cols) views with unit column stride, all of one dtype;
    ``indices`` int32 / ``values`` (R, whole payload), each tensor reading at its first payload chunk."""
    check_precision(precision)
    if len({p.dtype for p in params}) > 1:
        raise ValueError(f"one parameter dtype per launch; got {sorted({str(p.dtype) for p in params})}")
    if table.num_chunks == 0:
        return
    s, k, replicas = table.s, table.k, indices.shape[0]
    d = dct_matrix(s, params[0].device, torch.float32)
    a, b, c = NS_COEFFS
    _decode_orthogonal_kernel[(table.num_chunks,)](
        params[0], indices, values, d, table.meta, table.addresses(params), table.tensor_of_chunk,
        indices.stride(0), values.stride(0), float(lr), float(decay), a, b, c, UPDATE_RMS * s ** 0.5,
        R=replicas, S=s, K=k, KB=payload_block(k, s), CB=block_size(replicas, k, s), STEPS=NS_STEPS,
        BF16=precision == "bf16", MEAN_ALL=mean_over_all(mean), num_warps=8 if s >= 128 else 4,
    )
