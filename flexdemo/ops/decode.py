"""Fused decode + apply as one Triton kernel: one program per s x s chunk, one pass over the parameter.

The update is D^T M D for M the per-position mean of the replicas' coefficients; with k entries per replica M has
at most R * k nonzeros, so it is built as a sum of rank-one products, one tl.dot per block of payload entries,
replica by replica in order 0..R-1 (the same bits on every replica). In bf16x3 (the default) the tile is built
transposed, D[col]^T (w * D[row]), so that every operand reaches the tensor cores from shared memory as loaded (the
parameter tile is read and written transposed to match); other precisions build (w * D[row])^T D[col].
w = value / (number of replicas that sent that position), counted by comparing the index list with the other
replicas' lists (DeMo's mean), or value / R (``mean="all"``: no counting); with ``coefficient_sign``, the sign of
the position's sum over its senders / their number (the mean coefficients' signs decoded). At k = 32 of 64 x 64
and R = 2 that is a quarter of the work of a dense inverse, and no dense coefficient tile is ever built. Then
optional sign, p = p * decay - lr * update, stored in p's dtype (fp32 or bf16). One tensor per launch, or every
tensor of a ``ChunkTable``. The torch twin is ``decode_reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import dct_matrix, dct_matrix_halves
from flexdemo.ops.chunk_table import ChunkTable
from flexdemo.ops.decode_reference import mean_over_all
from flexdemo.ops.encode import payload_block, rate_arg
from flexdemo.ops.options import KernelOptions
from flexdemo.ops.precision import dot_basis_rows_bf16x3
from flexdemo.ops.rounding import cast_like
from flexdemo.ops.table_lookup import table_chunk


@triton.jit
def sender_count(idx, idx_ptr, rep: tl.constexpr, c, idx_rstride, R: tl.constexpr, K: tl.constexpr,
                 KB: tl.constexpr):
    """Per entry of replica rep's index block ``idx`` of chunk c: how many replicas sent that position (rep itself,
    and each other whose list holds it; indices are distinct within a chunk)."""
    kk = tl.arange(0, KB)
    count = tl.full((KB,), 1.0, dtype=tl.float32)
    for other in tl.static_range(R):
        if other != rep:
            for j2 in range(0, K, KB):
                o = tl.load(idx_ptr + other * idx_rstride + c * K + j2 + kk, mask=(j2 + kk) < K, other=-2)
                count += tl.sum((idx[:, None] == o[None, :]).to(tl.float32), axis=1)
    return count


@triton.jit
def _decode_kernel(p_ptr, idx_ptr, vals_ptr, d_ptr, halves_ptr, table_ptr, addr_ptr, owner_ptr, rows, cols, stride_p,
                   grid_cols, idx_rstride, val_rstride, lr, decay, GROUPED: tl.constexpr, R: tl.constexpr,
                   S: tl.constexpr, K: tl.constexpr, KB: tl.constexpr, SIGN: tl.constexpr, PRECISION: tl.constexpr,
                   LR_PTR: tl.constexpr, MEAN_ALL: tl.constexpr, COEF_SIGN: tl.constexpr):
    c = tl.program_id(0)  # the payload chunk, and (one tensor) the chunk of that tensor
    si = tl.arange(0, S)
    if GROUPED:  # a ChunkTable launch: this chunk's tensor, its shape, address and payload place
        t, n_rows, n_cols, gc, local, c = table_chunk(c, owner_ptr, table_ptr)
        pp = tl.load(addr_ptr + t * 2).to(p_ptr.dtype)
        sp = tl.load(addr_ptr + t * 2 + 1).to(tl.int32)
    else:
        pp, sp, n_rows, n_cols, gc, local = p_ptr, stride_p, rows, cols, grid_cols, c
    kk = tl.arange(0, KB)
    TRANSPOSED: tl.constexpr = PRECISION == "bf16x3"
    upd = tl.zeros((S, S), dtype=tl.float32)
    for rep in tl.static_range(R):
        for j in range(0, K, KB):
            live = (j + kk) < K
            idx = tl.load(idx_ptr + rep * idx_rstride + c * K + j + kk, mask=live, other=-1)
            val = tl.load(vals_ptr + rep * val_rstride + c * K + j + kk, mask=live, other=0.0).to(tl.float32)
            if COEF_SIGN:  # the sign of the position's sum over its senders (in replica order), split among them
                count = tl.zeros((KB,), dtype=tl.float32)
                total = tl.zeros((KB,), dtype=tl.float32)
                for other in tl.static_range(R):
                    for j2 in range(0, K, KB):
                        o = tl.load(idx_ptr + other * idx_rstride + c * K + j2 + kk, mask=(j2 + kk) < K, other=-2)
                        ov = tl.load(vals_ptr + other * val_rstride + c * K + j2 + kk, mask=(j2 + kk) < K,
                                     other=0.0).to(tl.float32)
                        hit = idx[:, None] == o[None, :]
                        count += tl.sum(hit.to(tl.float32), axis=1)
                        total += tl.sum(tl.where(hit, ov[None, :], 0.0), axis=1)
                w = tl.div_rn(tl.where(total > 0, 1.0, tl.where(total < 0, -1.0, 0.0)), tl.maximum(count, 1.0))
            else:
                if MEAN_ALL:
                    count = tl.full((KB,), R, dtype=tl.float32)
                else:
                    count = sender_count(idx, idx_ptr, rep, c, idx_rstride, R, K, KB)
                w = tl.fdiv(val, count, ieee_rounding=False)  # the fast division: within 2 ulps of value / count
            safe = tl.where(live, idx, 0)
            a = tl.load(d_ptr + (safe // S)[:, None] * S + si[None, :]) * w[:, None]
            if TRANSPOSED:
                upd = dot_basis_rows_bf16x3(upd, safe % S, a, halves_ptr, si, S)
            else:  # tf32 and fp32 want a^T from registers: the tile as it lies
                b = tl.load(d_ptr + (safe % S)[:, None] * S + si[None, :])
                upd = tl.dot(tl.trans(a), b, acc=upd, input_precision=PRECISION)
    if TRANSPOSED:  # upd[y, x] is the update of p[x, y]
        r = (local // gc) * S + si[None, :]
        q = (local % gc) * S + si[:, None]
    else:
        r = (local // gc) * S + si[:, None]
        q = (local % gc) * S + si[None, :]
    mask = (r < n_rows) & (q < n_cols)
    p = tl.load(pp + r * sp + q, mask=mask, other=0.0).to(tl.float32)
    if LR_PTR:  # read at run time: a captured CUDA graph replays with each step's rates
        lr = tl.load(lr)
        decay = tl.load(decay)
    if SIGN:  # lr * sign(update): lr's bits with the update's sign bit xor-ed in (lr may be negative: a stepped
        # base step decodes with lr = -1 into zeros), 0 where the update is 0
        lr_bits = (tl.zeros((), tl.float32) + lr).to(tl.int32, bitcast=True)
        step = ((upd.to(tl.int32, bitcast=True) & -2147483648) ^ lr_bits).to(tl.float32, bitcast=True)
        p = p * decay - tl.where(upd == 0, 0.0, step)
    else:
        p = p * decay - lr * upd
    tl.store(pp + r * sp + q, cast_like(p, p_ptr), mask=mask)


def decode_apply_triton(param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, layout: ChunkLayout,
                        k: int, lr: float | torch.Tensor, decay: float | torch.Tensor, sign: bool,
                        options: KernelOptions = KernelOptions(), mean: str = "senders",
                        coefficient_sign: bool = False) -> None:
    """Same contract as ``decode_apply_reference``; ``indices`` int32 (R, num_chunks * k), rows may be strided;
    ``lr`` and ``decay`` both floats, or both one-element fp32 tensors on the device (read by the kernel)."""
    if layout.num_chunks == 0:
        return
    s = layout.s
    d = dct_matrix(s, param.device, torch.float32)
    (lr, lr_ptr), (decay, _) = _rates(lr, decay)
    _decode_kernel[(layout.num_chunks,)](
        param, indices, values, d, dct_matrix_halves(s, param.device), d, d, d, layout.rows, layout.cols,
        param.stride(0), layout.grid[1], indices.stride(0), values.stride(0), lr, decay, GROUPED=False,
        R=indices.shape[0], S=s, K=k, KB=payload_block(k, s), SIGN=sign, PRECISION=options.decode_precision,
        num_warps=options.decode_warps, LR_PTR=lr_ptr, MEAN_ALL=mean_over_all(mean),
        COEF_SIGN=coefficient_sign,
    )


def decode_apply_triton_table(table: ChunkTable, params: list[torch.Tensor], indices: torch.Tensor,
                              values: torch.Tensor, lr: float | torch.Tensor, decay: float | torch.Tensor, sign: bool,
                              options: KernelOptions = KernelOptions(), mean: str = "senders",
                              coefficient_sign: bool = False) -> None:
    """``decode_apply_triton`` for every tensor of ``table`` in one launch, at the table's k. params[t]: (rows, cols)
    views with unit column stride, all of one dtype; ``indices`` / ``values`` (R, whole payload), each tensor
    reading at its first payload chunk."""
    if len({p.dtype for p in params}) > 1:
        raise ValueError(f"one parameter dtype per launch; got {sorted({str(p.dtype) for p in params})}")
    d = dct_matrix(table.s, params[0].device, torch.float32)
    (lr, lr_ptr), (decay, _) = _rates(lr, decay)
    _decode_kernel[(table.num_chunks,)](
        params[0], indices, values, d, dct_matrix_halves(table.s, d.device), table.meta, table.addresses(params),
        table.tensor_of_chunk, 0, 0, 0, 0,
        indices.stride(0), values.stride(0), lr, decay, GROUPED=True, R=indices.shape[0], S=table.s,
        K=table.k, KB=payload_block(table.k, table.s), SIGN=sign, PRECISION=options.decode_precision,
        num_warps=options.decode_warps, LR_PTR=lr_ptr, MEAN_ALL=mean_over_all(mean),
        COEF_SIGN=coefficient_sign,
    )


def _rates(lr: float | torch.Tensor, decay: float | torch.Tensor) -> tuple:
    """lr and decay as kernel arguments: both floats, or both device scalars (``encode.rate_arg``)."""
    out = rate_arg(lr), rate_arg(decay)
    if out[0][1] != out[1][1]:
        raise ValueError("lr and decay must both be floats or both be tensors")
    return out
