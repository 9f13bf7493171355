"""Fused encode as one Triton kernel: one program per s x s chunk, one pass over the gradient and the momentum.

momentum update -> 2-D DCT (two small matmuls) -> top-k of |C| (ties: lowest index) -> payload (values in the wire
dtype, int32 chunk-local indices; with ``bits``, also each value's code and the chunk's scale, ``flexdemo.quant``) ->
momentum minus the inverse DCT of what was sent (of what the codes stand for; rank-k products of gathered
basis rows, read back from the payload: a quarter of a dense inverse at k = 32 of 64 x 64, and the rest of the
momentum never goes through a transform) -> momentum written back. The top-k method (``KernelOptions.select``):
``rank``, ``bisect`` or ``maxmask``. One tensor per launch, or every tensor of a ``ChunkTable``. Bytes moved per element: read grad, read + write momentum. The torch twin is ``encode_reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import dct_matrix
from flexdemo.ops.chunk_table import ChunkTable
from flexdemo.ops.codes import code_of, dequantised
from flexdemo.ops.options import KernelOptions
from flexdemo.ops.precision import runnable
from flexdemo.ops.rounding import INTERPRETING, cast_like, round_to_bf16
from flexdemo.ops.table_lookup import table_chunk
from flexdemo.quant import VALUE_BITS


@triton.jit
def _exclusive_rank(x):
    """Per element of an (S, S) int32 tile: the sum of x over the elements before it in row-major order."""
    row_incl = tl.cumsum(x, axis=1)
    row_tot = tl.sum(x, axis=1)
    row_start = tl.cumsum(row_tot, axis=0) - row_tot
    return row_start[:, None] + row_incl - x


@triton.jit
def _count3(bits, c1, c2, c3):
    """count(bits >= c) for three candidates in one reduction: packed 16 bits apart in an int64 (s <= 128)."""
    packed = tl.sum((bits >= c1).to(tl.int64) + ((bits >= c2).to(tl.int64) << 16) + ((bits >= c3).to(tl.int64) << 32))
    return (packed & 0xFFFF).to(tl.int32), ((packed >> 16) & 0xFFFF).to(tl.int32), (packed >> 32).to(tl.int32)


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
        n1, n2, n3 = _count3(bits, c1, c2, c3)
        t_new = tl.where(n3 >= K, c3, tl.where(n2 >= K, c2, tl.where(n1 >= K, c1, t)))
        n_t = tl.where(n3 >= K, n3, tl.where(n2 >= K, n2, tl.where(n1 >= K, n1, n_t)))
        t = t_new
        sh -= 2
    return t


@triton.jit
def _store_above_and_ties(coef, bits, t, offs, vals_ptr, idx_ptr, c, K: tl.constexpr):
    """Given t, the k-th largest of bits: payload = every entry above t, then the lowest-index ties at t, in index
    order."""
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


@triton.jit
def _rank_desc(keys):
    """Per entry of (N,) distinct keys: how many are larger, i.e. its slot in a descending sort. One N x N comparison
    tile; the keys carry their tie rule (a position in their low bits), so one compare per pair."""
    return tl.sum((keys[None, :] > keys[:, None]).to(tl.int32), axis=1)


@triton.jit
def _candidate_key(vbits, index, S: tl.constexpr):
    """A candidate's ranking key, int64, distinct and ordered like (|value| descending, index ascending): |value|'s
    bits << 17 | (s*s - 1 - index) << 1 | sign (s <= 128: the index field is 16 bits). The ranking compares keys
    only, and the value and index come back from the key (``_candidate_of``)."""
    return (((vbits & 0x7FFFFFFF).to(tl.int64) << 17) | ((S * S - 1 - index).to(tl.int64) << 1)
            | ((vbits >> 31) & 1).to(tl.int64))


@triton.jit
def _candidate_of(key, S: tl.constexpr):
    """(value, index) of a ``_candidate_key``."""
    vbits = (key >> 17).to(tl.int32) | ((key & 1).to(tl.int32) << 31)
    return vbits.to(tl.float32, bitcast=True), S * S - 1 - ((key >> 1) & 0xFFFF).to(tl.int32)


@triton.jit
def _extract_candidates(cbits, lo, n_lo, row, S: tl.constexpr, K: tl.constexpr):
    """Copy the candidates of the transposed coefficient tile ``cbits`` (element (i, j) is C's index j * S + i) to
    ``row`` (as ``_candidate_key``s) and return their number n <= S: every coefficient at or above lo
    when n_lo <= S, else (lo is the k-th largest, with many ties) everything above lo and the lowest-index ties, k in
    all (the index bound of the ties found by bisection). Row by row, lowest column first, one candidate per row per
    round: as many rounds as the most candidates in one row, each two row reductions and one store (no scan of the
    whole tile, so few registers); each row's candidates land at its exclusive prefix count (the order does not
    matter: the ranking that follows sorts them). Rows with nothing left store to a spare slot, row[S:2S]."""
    si = tl.arange(0, S)
    mag = cbits & 0x7FFFFFFF
    col = tl.zeros_like(cbits) + si[None, :]
    if n_lo <= S:  # the common case: all at or above lo
        take = mag >= lo
    else:
        real = col * S + si[:, None]
        tie = mag == lo
        need = K - tl.sum((mag > lo).to(tl.int32))
        p_lo = tl.full((), 0, tl.int32)  # count(tie & real < p_lo) < need <= count(tie & real < p_hi)
        p_hi = tl.full((), S * S, tl.int32)
        while p_hi - p_lo > 1:
            mid = (p_lo + p_hi) // 2
            enough = tl.sum((tie & (real < mid)).to(tl.int32)) >= need
            p_hi = tl.where(enough, mid, p_hi)
            p_lo = tl.where(enough, p_lo, mid)
        take = (mag > lo) | (tie & (real < p_hi))
    key = tl.where(take, col, S)  # the column, or S: not (or no more)
    cnt = tl.sum(take.to(tl.int32), axis=1)
    start = tl.cumsum(cnt, axis=0) - cnt
    for j in range(tl.max(cnt)):
        first = tl.min(key, axis=1)
        v = tl.sum(tl.where(col == first[:, None], cbits, 0), axis=1)  # exact bits: one nonzero term
        tl.store(row + tl.where(first < S, start + j, S + si), _candidate_key(v, first * S + si, S))
        key = tl.where(key == first[:, None], S, key)
    return tl.sum(cnt)


@triton.jit
def _narrow(bits, lo, n_lo, hi, K: tl.constexpr, CAP: tl.constexpr):
    """From count(bits >= lo) = n_lo >= K and count(bits >= hi) < K, move lo up and hi down (three quartile
    candidates per round, their counts packed in one int64 reduction) until n_lo <= CAP or hi = lo + 1 (lo is then
    the k-th largest). Returns lo, n_lo."""
    while (n_lo > CAP) & (hi - lo > 1):
        w = hi - lo
        c1 = lo + (w >> 2)
        c2 = lo + (w >> 1)
        c3 = c2 + (w >> 2)
        n1, n2, n3 = _count3(bits, c1, c2, c3)
        hi = tl.where(n1 < K, c1, tl.where(n2 < K, c2, tl.where(n3 < K, c3, hi)))
        lo_new = tl.where(n3 >= K, c3, tl.where(n2 >= K, c2, tl.where(n1 >= K, c1, lo)))
        n_lo = tl.where(n3 >= K, n3, tl.where(n2 >= K, n2, tl.where(n1 >= K, n1, n_lo)))
        lo = lo_new
    return lo, n_lo


@triton.jit
def _forward_dct_bf16(d, m, TRANSPOSED: tl.constexpr):
    """D m D^T (TRANSPOSED: its transpose, D m^T D^T) in one bf16 tensor-core pass per product, fp32 accumulation.
    The interpreter, whose bf16 tl.dot is wrong, multiplies the same bf16 factors in fp32."""
    if INTERPRETING:
        db = round_to_bf16(d)
        mb = round_to_bf16(m)
        if TRANSPOSED:
            mb = tl.trans(mb)
        half = round_to_bf16(tl.dot(db, mb, input_precision="ieee"))
        return tl.dot(half, tl.trans(db), input_precision="ieee")
    db = d.to(tl.bfloat16)
    mb = m.to(tl.bfloat16)
    if TRANSPOSED:
        mb = tl.trans(mb)
    return tl.dot(tl.dot(db, mb).to(tl.bfloat16), tl.trans(db))


@triton.jit
def _encode_kernel(g_ptr, m_ptr, d_ptr, vals_ptr, idx_ptr, codes_ptr, scales_ptr, scratch_ptr, table_ptr, addr_ptr,
                   owner_ptr, rows, cols, stride_g, stride_m, grid_cols, zero, beta, lr, lose, HAS_GRAD: tl.constexpr,
                   GROUPED: tl.constexpr, S: tl.constexpr, K: tl.constexpr, KB: tl.constexpr, PRECISION: tl.constexpr,
                   FWD_PRECISION: tl.constexpr, SELECT: tl.constexpr, LR_PTR: tl.constexpr, QBITS: tl.constexpr,
                   LOSE_PART: tl.constexpr):
    c = tl.program_id(0)  # the payload chunk, and (one tensor) the chunk of that tensor
    si = tl.arange(0, S)
    if GROUPED:  # a ChunkTable launch: this chunk's tensor, its shape, addresses and payload place
        t, n_rows, n_cols, gc, local, c = table_chunk(c, owner_ptr, table_ptr)
        addr = addr_ptr + t * 4
        g_addr = tl.load(addr)
        gp = g_addr.to(g_ptr.dtype)
        sg = tl.load(addr + 1).to(tl.int32)
        mp = tl.load(addr + 2).to(m_ptr.dtype)
        sm = tl.load(addr + 3).to(tl.int32)
        g_live = g_addr != 0  # a tensor without a gradient: its momentum only decays
    else:
        gp, sg, mp, sm, g_live = g_ptr, stride_g, m_ptr, stride_m, 1
        n_rows, n_cols, gc, local = rows, cols, grid_cols, c
    r = (local // gc) * S + si[:, None]
    q = (local % gc) * S + si[None, :]
    mask = (r < n_rows) & (q < n_cols)
    g_mask = mask & (tl.zeros_like(r) + g_live != 0)
    m = tl.load(mp + r * sm + q, mask=mask, other=0.0).to(tl.float32)  # fp32 or bf16 (momentum_dtype)
    if HAS_GRAD:
        g = tl.load(gp + r * sg + q, mask=g_mask, other=0.0).to(tl.float32)
        if LR_PTR:  # read at run time: a captured CUDA graph replays with each step's rate
            m = beta * m + tl.load(lr) * g
        else:
            m = beta * m + lr * g
    else:
        m = beta * m
    d = tl.load(d_ptr + si[:, None] * S + si[None, :])
    COMPACT: tl.constexpr = SELECT == "rank" and 2 * K <= S  # rank selection of at most s candidates
    if FWD_PRECISION == "bf16":
        coef = _forward_dct_bf16(d, m, COMPACT)
    elif COMPACT:
        # The tile is C^T (its rows are C's columns, which the selection below may use as well as C's rows):
        # C^T = D m^T D^T: the first product's B operand is then m^T, which tf32 wants K-major, i.e. m as it lies in
        # registers; B = m (C = D m D^T) would be stored transposed to shared memory, 8-way bank conflicts.
        coef = tl.dot(tl.dot(d, tl.trans(m), input_precision=FWD_PRECISION), tl.trans(d),
                      input_precision=FWD_PRECISION)
    else:
        coef = tl.dot(tl.dot(d, m, input_precision=FWD_PRECISION), tl.trans(d), input_precision=FWD_PRECISION)
    offs = si[:, None] * S + si[None, :]
    if SELECT == "rank":
        # Bracket the k-th largest |c| (as fp32 bits, which order like the values): k rows have their maximum at or
        # above the k-th largest row maximum, so it is a lower bound, and the overall maximum + 1 an upper one.
        # Narrow until at most CAP = S coefficients are at or above the lower bound (or it is the k-th largest, with
        # many exact ties), copy those few out row by row (through a per-program scratch row; the barrier makes the
        # copies visible to every thread) and rank them against each other: slot = rank, ties to the lowest index,
        # payload in descending magnitude, as max-and-mask.
        bits = tl.abs(coef).to(tl.int32, bitcast=True)
        if COMPACT:
            rmax = tl.max(bits, axis=1)
            # distinct keys: each line's maximum less its low bits, the line in them (still a lower bound)
            rkey = (rmax & ~(S - 1)) | (S - 1 - si)
            lo = tl.sum(tl.where(_rank_desc(rkey) == K - 1, rkey & ~(S - 1), 0))
            hi = tl.max(rmax) + 1
        else:
            lo = tl.zeros((), tl.int32)
            hi = tl.max(bits) + 1
        n_lo = tl.sum((bits >= lo).to(tl.int32))
        lo, n_lo = _narrow(bits, lo, n_lo, hi, K, S if COMPACT else K)
        if COMPACT:
            row = scratch_ptr + tl.program_id(0).to(tl.int64) * (2 * S)
            n = _extract_candidates(coef.to(tl.int32, bitcast=True), lo, n_lo, row, S, K)
            tl.debug_barrier()
            key = tl.load(row + si, mask=si < n, other=-1)  # empties: -1, below every candidate
            rank = _rank_desc(key)
            cv, ci = _candidate_of(key, S)
            sent = rank < K
            wv = cast_like(cv, vals_ptr)  # as the wire holds it
            tl.store(vals_ptr + c * K + rank, wv, mask=sent)
            tl.store(idx_ptr + c * K + rank, ci, mask=sent)
            if QBITS:  # the codes from the ranked values in registers, no read-back; the scale is the largest
                # |value| sent: the chunk's largest |c| (ranked first, always sent), rounded as the wire rounds it
                top = cast_like((hi - 1).to(tl.float32, bitcast=True), vals_ptr).to(tl.float32)
                scale = top.to(tl.bfloat16).to(tl.float32)
                tl.store(scales_ptr + c, scale)
                tl.store(codes_ptr + c * K + rank, code_of(wv.to(tl.float32), scale, QBITS).to(tl.uint8), mask=sent)
        else:  # 2k > s: narrowed to the k-th largest itself; all above it, lowest-index ties, in index order
            _store_above_and_ties(coef, bits, lo, offs, vals_ptr, idx_ptr, c, K)
    elif SELECT == "bisect":
        # the k-th largest |c| two bits at a time; all above it and the lowest-index ties, in index order
        bits = tl.abs(coef).to(tl.int32, bitcast=True)
        _store_above_and_ties(coef, bits, _kth_largest_bound(bits, K), offs, vals_ptr, idx_ptr, c, K)
    else:
        # k rounds of max-and-mask (ties: lowest index), payload in descending magnitude
        mag = tl.abs(coef)
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
    if QBITS and not COMPACT:  # values as QBITS-bit codes (flexdemo.quant): the scale is the largest |value| sent
        amax = tl.zeros((), tl.float32)
        for j in range(0, K, KB):
            pv = tl.load(vals_ptr + c * K + j + kk, mask=(j + kk) < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(pv)))
        scale = amax.to(tl.bfloat16).to(tl.float32)
        tl.store(scales_ptr + c, scale)
    for j in range(0, K, KB):
        live = (j + kk) < K
        pi = tl.load(idx_ptr + c * K + j + kk, mask=live, other=0)
        if COMPACT and QBITS > 1:  # the codes stored above: what they stand for
            code = tl.load(codes_ptr + c * K + j + kk, mask=live, other=0).to(tl.float32)
            pv = tl.where(live, dequantised(code, scale, QBITS), 0.0)
        else:
            pv = tl.load(vals_ptr + c * K + j + kk, mask=live, other=0.0).to(tl.float32)
            if QBITS and not COMPACT:
                code = code_of(pv, scale, QBITS)
                tl.store(codes_ptr + c * K + j + kk, code.to(tl.uint8), mask=live)
                if QBITS > 1:  # the replicas apply what the codes stand for (signs: the value, removed whole)
                    pv = tl.where(live, dequantised(code, scale, QBITS), 0.0)  # a padding lane's 0 is a code too
        if LOSE_PART:  # sent_keep: the momentum loses (1 - keep) times what was sent
            pv = pv * lose
        a = tl.load(d_ptr + (pi // S)[:, None] * S + si[None, :]) * pv[:, None]
        b = tl.load(d_ptr + (pi % S)[:, None] * S + si[None, :])
        m = tl.dot(tl.trans(-a), b, acc=m, input_precision=PRECISION)
    # The same addresses as the first load, computed again from ``zero`` (a runtime 0 the compiler cannot fold):
    # otherwise the 64-bit address tile of the first load is kept live to here, and the kernel spills.
    si = si + zero
    r = (local // gc) * S + si[:, None]
    q = (local % gc) * S + si[None, :]
    tl.store(mp + r * sm + q, cast_like(m, mp), mask=(r < n_rows) & (q < n_cols))


def encode_triton(grad: torch.Tensor | None, delta: torch.Tensor, layout: ChunkLayout, beta: float,
                  lr: float | torch.Tensor, k: int, out_vals: torch.Tensor, out_idx: torch.Tensor,
                  options: KernelOptions = KernelOptions(), bits: int = 0, out_codes: torch.Tensor | None = None,
                  out_scales: torch.Tensor | None = None, keep: float = 0.0) -> None:
    """Same contract as ``encode_reference``; ``out_idx`` is int32; ``lr`` may be a one-element fp32 tensor on the
    device (read by the kernel: what a CUDA graph captures)."""
    opts = _launch_options(options, k, layout.s, out_vals.dtype, bits)
    if layout.num_chunks == 0:
        return
    d = dct_matrix(layout.s, delta.device, torch.float32)
    g = grad if grad is not None else delta
    rate, lr_ptr = rate_arg(lr)
    codes, scales = _code_outputs(bits, out_codes, out_scales, layout.num_chunks, k, d)
    return _encode_kernel[(layout.num_chunks,)](
        g, delta, d, out_vals, out_idx, codes, scales, _scratch(layout.num_chunks, opts, delta.device), d, d, d,
        layout.rows, layout.cols, g.stride(0), delta.stride(0), layout.grid[1], 0, float(beta), rate, 1.0 - keep,
        HAS_GRAD=grad is not None, GROUPED=False, LR_PTR=lr_ptr, LOSE_PART=bool(keep), **opts,
    )


def encode_triton_table(table: ChunkTable, grads: list[torch.Tensor | None], deltas: list[torch.Tensor], beta: float,
                        lr: float | torch.Tensor, out_vals: torch.Tensor, out_idx: torch.Tensor,
                        options: KernelOptions = KernelOptions(), addresses: torch.Tensor | None = None,
                        bits: int = 0, out_codes: torch.Tensor | None = None,
                        out_scales: torch.Tensor | None = None, keep: float = 0.0) -> None:
    """``encode_triton`` for every tensor of ``table`` in one launch, at the table's k. grads[t] / deltas[t]:
    (rows, cols) views with unit column stride (grads[t] None: no gradient); ``out_vals`` / ``out_idx`` span the
    whole payload, each tensor writing at its first payload chunk. All gradients given must share one dtype.
    ``addresses``: the rows ``table.addresses(grads, deltas)`` would give, already on the device (a captured CUDA
    graph reads a fixed copy of them, rewritten each step)."""
    opts = _launch_options(options, table.k, table.s, out_vals.dtype, bits)
    present = [g for g in grads if g is not None]
    if len({g.dtype for g in present}) > 1:
        raise ValueError(f"one gradient dtype per launch; got {sorted({str(g.dtype) for g in present})}")
    if len({m.dtype for m in deltas}) > 1:  # the kernel reads every momentum as the first one's dtype
        raise ValueError(f"one momentum dtype per launch; got {sorted({str(m.dtype) for m in deltas})}")
    d = dct_matrix(table.s, deltas[0].device, torch.float32)
    rate, lr_ptr = rate_arg(lr)
    codes, scales = _code_outputs(bits, out_codes, out_scales, out_idx.numel() // table.k, table.k, d)
    _encode_kernel[(table.num_chunks,)](
        present[0] if present else deltas[0], deltas[0], d, out_vals, out_idx, codes, scales,
        _scratch(table.num_chunks, opts, d.device), table.meta,
        table.addresses(grads, deltas) if addresses is None else addresses, table.tensor_of_chunk,
        0, 0, 0, 0, 0, 0, float(beta), rate, 1.0 - keep,
        HAS_GRAD=bool(present), GROUPED=True, LR_PTR=lr_ptr, LOSE_PART=bool(keep), **opts,
    )


def rate_arg(lr: float | torch.Tensor) -> tuple:
    """A rate as a kernel argument, and whether it is a pointer: a float, or a one-element fp32 tensor read at run
    time."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dtype != torch.float32:
            raise ValueError(f"a rate as a tensor must be one fp32 element; got {lr.dtype} of shape "
                             f"{tuple(lr.shape)}")
        return lr, True
    return float(lr), False


def _launch_options(options: KernelOptions, k: int, s: int, wire: torch.dtype, bits: int = 0) -> dict:
    """The launch's compile-time arguments."""
    opts = dict(S=s, K=k, KB=payload_block(k, s), PRECISION=runnable(options.subtract_precision),
                FWD_PRECISION=runnable(options.forward_for(wire)), SELECT=options.select,
                num_warps=options.encode_warps, QBITS=bits)
    if s == 64 and options.maxnreg:  # measured for 64 x 64 only; the interpreter ignores it
        opts["maxnreg"] = options.maxnreg
    return opts


def _code_outputs(bits: int, codes: torch.Tensor | None, scales: torch.Tensor | None, chunks: int, k: int,
                  spare: torch.Tensor) -> tuple:
    """The codes and scales a quantising launch writes (``spare``, never written, for a launch without codes)."""
    if not bits:
        return spare, spare
    if bits not in VALUE_BITS[1:]:
        raise ValueError(f"bits={bits}; allowed: 0 (values as sent), {', '.join(map(str, VALUE_BITS[1:]))}")
    if codes is None or scales is None or codes.dtype != torch.uint8 or codes.numel() != chunks * k \
            or scales.dtype != torch.float32 or scales.numel() != chunks:
        raise ValueError(f"bits={bits} needs out_codes (uint8, {chunks * k}) and out_scales (fp32, {chunks})")
    return codes, scales


def _scratch(programs: int, opts: dict, device: torch.device) -> torch.Tensor:
    """The rank selection's per-program row: up to s candidates (``_candidate_key``), then s spare slots."""
    s = opts["S"]
    n = programs * 2 * s if opts["SELECT"] == "rank" and 2 * opts["K"] <= s else 1
    return torch.empty(n, dtype=torch.int64, device=device)


def payload_block(k: int, s: int) -> int:
    """Payload entries per rank-KB product: all k at once up to s (one tl.dot), else s at a time (tl.dot: >= 16)."""
    return max(16, min(triton.next_power_of_2(k), s))
