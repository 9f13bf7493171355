"""base_step=orthogonal, orthogonal_scope=chunk, as one Triton launch: each s x s chunk of every tensor of a
``ChunkTable`` orthogonalised in place, one program per chunk, the chunk in registers through every iteration.

The torch twin (``newton_schulz_reference.orthogonalize_chunks_reference``) pads and copies every tensor into a
batch of chunks and runs the quintic Newton-Schulz iteration as batched matmuls, each product and each elementwise
step a pass over memory: on an H200 11.7 ms per `base` step in bf16 against the default step's 2-4 ms, where
this kernel takes 5.9 ms (benchmarks/HISTORY.md). Here a chunk is read once and written once; the ragged edge of a tensor reads as zero rows /
columns, which the iteration keeps zero, as the twin's padding does. ``precision`` bf16 rounds the iterate and each
product to bf16 as the twin's bf16 tensors do (the products accumulate in fp32 either way, so the two agree to bf16
rounding, not bit for bit); fp32 multiplies in tf32x3 (within ~1e-6 of fp32). The same launch on every replica gives
the same bits.

Precision matters more here than for whole matrices: a chunk's decoded direction has rank at most about k (k
coefficients), and the iteration grows a small singular value about 3.4x a round, so bf16's rounding (~2^-9) of the
iterate becomes steps of 0.05-0.5 along directions the payload never named (64 x 64, k 32: ~35 of 64; fp32: none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdemo.ops.chunk_table import ChunkTable
from flexdemo.ops.newton_schulz_reference import NS_COEFFS, NS_STEPS, UPDATE_RMS
from flexdemo.ops.rounding import INTERPRETING, round_to_bf16
from flexdemo.ops.table_lookup import table_chunk

NS_PRECISIONS = ("fp32", "bf16")


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
def _ns_chunk_kernel(x_ptr, table_ptr, addr_ptr, owner_ptr, a, b, c, scale, S: tl.constexpr, STEPS: tl.constexpr,
                     BF16: tl.constexpr):
    t, n_rows, n_cols, gc, local, _ = table_chunk(tl.program_id(0), owner_ptr, table_ptr)
    xp = tl.load(addr_ptr + t * 2).to(x_ptr.dtype)
    sx = tl.load(addr_ptr + t * 2 + 1).to(tl.int32)
    si = tl.arange(0, S)
    r = (local // gc) * S + si[:, None]
    q = (local % gc) * S + si[None, :]
    mask = (r < n_rows) & (q < n_cols)
    x = tl.load(xp + r * sx + q, mask=mask, other=0.0)
    x = _bf16(x / (tl.sqrt(tl.sum(x * x)) + 1e-7), BF16)  # Frobenius-normalised: every singular value <= 1
    for _ in tl.static_range(STEPS):  # X <- a X + (b A + c A^2) X, A = X X^T
        g = _bf16(_dot(x, tl.trans(x), BF16), BF16)
        m = _bf16(b * g + c * _bf16(_dot(g, g, BF16), BF16), BF16)
        x = _bf16(a * x + _bf16(_dot(m, x, BF16), BF16), BF16)
    tl.store(xp + r * sx + q, x * scale, mask=mask)


def orthogonalize_chunks_triton(table: ChunkTable, targets: list[torch.Tensor], precision: str = "fp32") -> None:
    """Every chunk of every ``targets[t]`` ((rows, cols) fp32 views with unit column stride, as the table's layouts)
    replaced by UPDATE_RMS sqrt(s) times its orthogonal factor (approximately; Newton-Schulz as
    ``orthogonal_step``), in place, in one launch."""
    if precision not in NS_PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(NS_PRECISIONS)}")
    if any(x.dtype != torch.float32 for x in targets):
        raise ValueError(f"the chunks' directions must be fp32; got {sorted({str(x.dtype) for x in targets})}")
    if table.num_chunks == 0:
        return
    a, b, c = NS_COEFFS
    s = table.s
    _ns_chunk_kernel[(table.num_chunks,)](
        targets[0], table.meta, table.addresses(targets), table.tensor_of_chunk, a, b, c, UPDATE_RMS * s ** 0.5,
        S=s, STEPS=NS_STEPS, BF16=precision == "bf16", num_warps=8 if s >= 128 else 4,
    )
