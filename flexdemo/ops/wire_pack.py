"""The default wire's packing as two Triton kernels: one program per chunk (and replica), in place of a dozen torch
passes over the payload (sort, gathers, bit planes, a bitmap scatter, an argsort to unpack).

pack: a chunk's k positions sorted (with their codes or values), its Elias-Fano code and (value_bits) its codes'
bytes written where ``WireLayout.pack`` puts them. unpack: every replica's chunks back to int32 positions and
(value_bits) dequantised fp32 values, as ``WireLayout.unpack`` returns them. The bytes and numbers are exactly the
torch path's (``flexdemo.wire`` and ``flexdemo.elias_fano``: the twins these are tested against); the parts that are
not per chunk (dense values, scales, padding) stay in torch. Codes go through the kernels where a chunk's codes fill
whole bytes (k * value_bits a multiple of 8, as at every k the presets use), else the whole payload through torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdemo import elias_fano
from flexdemo.ops.codes import dequantised
from flexdemo.wire import WireLayout


@triton.jit
def _pack_kernel(idx_ptr, src_ptr, ef_ptr, dst_ptr, U: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                 LO: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, BITS: tl.constexpr, CBP: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, KP)
    live = i < K
    # sorted by position, the slot each came from in the low part of the key (positions are distinct per chunk;
    # repeated ones keep their slots' order, as the stable torch sort does); padding lanes sort last
    pos = tl.load(idx_ptr + c * K + i, mask=live, other=U).to(tl.int64)
    key = tl.sort(pos * KP + i)
    sp = (key // KP).to(tl.int32)
    slot = (key % KP).to(tl.int32)
    if BITS:  # the codes in that order, BITS each, the first in a byte's low bits: K * BITS / 8 bytes a chunk
        code = tl.load(src_ptr + c * K + slot, mask=live, other=0).to(tl.int32)
        b = tl.arange(0, CBP)
        at = i * BITS
        part = tl.where(((at >> 3)[None, :] == b[:, None]) & live[None, :], code[None, :] << (at & 7)[None, :], 0)
        tl.store(dst_ptr + c * (K * BITS // 8) + b, tl.sum(part, axis=1).to(tl.uint8), mask=b < K * BITS // 8)
    else:  # the values in that order, in their dtype
        tl.store(dst_ptr + c * K + i, tl.load(src_ptr + c * K + slot, mask=live), mask=live)
    # Elias-Fano: position i's LO low bits at bit i * LO, then the bitmap with bit (high_i + i) set; a byte is the sum
    # of its (disjoint) parts
    b = tl.arange(0, NBP)[:, None]
    shift = (i * LO)[None, :] - 8 * b
    low = (sp & ((1 << LO) - 1))[None, :]
    left, right = tl.minimum(tl.maximum(shift, 0), 31), tl.minimum(tl.maximum(-shift, 0), 31)
    part = tl.where(shift >= 0, low << left, low >> right)
    part &= 0xFF
    top = (K * LO + (sp >> LO) + i)[None, :]
    part += tl.where((top >> 3) == b, 1 << (top & 7), 0)
    byte = tl.sum(tl.where(live[None, :], part, 0), axis=1)
    tl.store(ef_ptr + c * NB + tl.arange(0, NBP), byte.to(tl.uint8), mask=tl.arange(0, NBP) < NB)


@triton.jit
def _unpack_kernel(raw_ptr, row_stride, ef_off, codes_off, scales_off, idx_ptr, val_ptr, val_rstride, chunks,
                   K: tl.constexpr, KP: tl.constexpr, LO: tl.constexpr, NB: tl.constexpr, HB: tl.constexpr,
                   HBP: tl.constexpr, BITS: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    row = raw_ptr + r * row_stride
    ef = row + ef_off + c * NB
    i = tl.arange(0, KP)
    live = i < K
    low = tl.zeros((KP,), tl.int32)
    if LO:  # position i's low bits: a 32-bit window from the byte they start in (LO <= 16, offset <= 7)
        first = (i * LO) >> 3
        window = tl.zeros((KP,), tl.int32)
        for t in tl.static_range(4):
            window |= tl.load(ef + first + t, mask=live & (first + t < NB), other=0).to(tl.int32) << (8 * t)
        low = (window >> ((i * LO) & 7)) & ((1 << LO) - 1)
    # the bitmap's set bits in order: the i-th is where the running count of set bits reaches i + 1
    q = tl.arange(0, HBP)
    at = K * LO + q
    bit = (tl.load(ef + (at >> 3), mask=q < HB, other=0).to(tl.int32) >> (at & 7)) & 1
    seen = tl.cumsum(bit, axis=0)
    hit = (bit[None, :] == 1) & (seen[None, :] == (i + 1)[:, None])
    high = tl.sum(tl.where(hit, q[None, :], 0), axis=1) - i
    tl.store(idx_ptr + r * chunks * K + c * K + i, (high << LO) + low, mask=live)
    if BITS:  # quant.dequantize's operations: (2 code - levels) / levels * scale, the scale a bf16's bits
        at = i * BITS
        code = (tl.load(row + codes_off + c * (K * BITS // 8) + (at >> 3), mask=live, other=0).to(tl.int32)
                >> (at & 7)) & ((1 << BITS) - 1)
        half = tl.load(row + scales_off + 2 * c).to(tl.int32) | (tl.load(row + scales_off + 2 * c + 1).to(tl.int32)
                                                                  << 8)
        scale = (half << 16).to(tl.float32, bitcast=True)
        val = dequantised(code.to(tl.float32), scale, BITS)
        tl.store(val_ptr + r * val_rstride + c * K + i, val, mask=live)


TILE_LIMIT = 1 << 16  # elements of a program's bytes-by-positions tile (the default's: 64 x 32)


def kernels_fit(wire: WireLayout) -> bool:
    """Whether the kernels take this wire: Elias-Fano indices, codes (if any) that fill whole bytes a chunk, and a
    tile of bytes by positions that fits a program (k up to a few hundred)."""
    if not wire.positions or wire.num_sparse == 0 or (wire.k * wire.value_bits) % 8:
        return False
    k, u = wire.k, wire.positions
    widest = max(elias_fano.chunk_nbytes(u, k), elias_fano.high_bits(u, k), k * wire.value_bits // 8)
    return triton.next_power_of_2(k) * triton.next_power_of_2(widest) <= TILE_LIMIT


def _shape(wire: WireLayout) -> dict:
    k, u = wire.k, wire.positions
    return dict(K=k, KP=triton.next_power_of_2(k), LO=elias_fano.low_bits(u, k), NB=elias_fano.chunk_nbytes(u, k))


def pack_triton(wire: WireLayout, sparse_idx: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                codes: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """``WireLayout.pack`` with the per-chunk work in one launch; the same bytes."""
    if not kernels_fit(wire):
        return wire.pack(sparse_idx, values, out, codes, scales)
    ns, vb, ib = wire.num_sparse, wire.value_nbytes, wire.indices_nbytes
    chunks, shape = ns // wire.k, _shape(wire)
    ef = out[vb : vb + ib]
    if wire.value_bits:
        db, cb = wire.code_offsets
        out[:db] = values[ns:].view(torch.uint8)
        out[db:cb] = scales.bfloat16().view(torch.uint8)
        src, dst = codes, out[cb:vb]
        cbp = triton.next_power_of_2(wire.k * wire.value_bits // 8)
    else:
        item = values.element_size()
        out[ns * item : vb] = values[ns:].view(torch.uint8)
        src, dst, cbp = values, out[: ns * item].view(values.dtype), 1
    _pack_kernel[(chunks,)](sparse_idx, src, ef, dst, U=wire.positions, NBP=triton.next_power_of_2(shape["NB"]),
                            BITS=wire.value_bits, CBP=cbp, num_warps=1, **shape)
    out[vb + ib :] = 0
    return out


def unpack_triton(wire: WireLayout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``WireLayout.unpack`` with the per-chunk work in one launch over every replica's row; the same numbers."""
    if not kernels_fit(wire):
        return wire.unpack(rows)
    lead, flat = rows.shape[:-1], rows.reshape(-1, rows.shape[-1])
    replicas, ns, vb = flat.shape[0], wire.num_sparse, wire.value_nbytes
    chunks, shape = ns // wire.k, _shape(wire)
    hb = elias_fano.high_bits(wire.positions, wire.k)
    idx = torch.empty(replicas, ns, dtype=torch.int32, device=rows.device)
    if wire.value_bits:
        db, cb = wire.code_offsets
        vals = torch.empty(replicas, ns + wire.num_dense, dtype=torch.float32, device=rows.device)
        vals[:, ns:] = flat[:, :db].view(wire.value_dtype).float()
    else:
        db = cb = 0
        vals = idx  # not written
    _unpack_kernel[(chunks, replicas)](flat, flat.stride(0), vb, cb, db, idx, vals, vals.stride(0), chunks,
                                       HB=hb, HBP=triton.next_power_of_2(hb), BITS=wire.value_bits, num_warps=1,
                                       **shape)
    if not wire.value_bits:
        vals = flat[:, :vb].view(wire.value_dtype)
    return idx.reshape(*lead, ns), vals.reshape(*lead, -1)
