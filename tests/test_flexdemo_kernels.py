"""The Triton kernels against their torch twins, on small odd shapes (the interpreter on CPU, the GPU through the
device tool: the same tests run on CUDA tensors when a GPU is present).

Tolerances: both sides compute the DCT to about fp32 accuracy (the kernel's tl.dot in ieee, or tf32x3: three tf32
products, ~2^-21 relative), so coefficients agree to the rounding of 2 x s-term sums and residuals (the momentum minus
a k-term sum) to that of the k-term sum: rtol 1e-5, atol 1e-6 (times the data's scale). Selected index sets are
compared where the k-th and (k+1)-th magnitudes are more than 1e-5 apart. The GPU's default forward DCT (bf16x3:
each factor to 16 significant bits) moves coefficients by up to ~2^-15 of the sum of its terms' magnitudes, so there
the sets are compared where the gap is above 1e-3 (s <= 32, unit data), the values to the wire's rounding, and the
residual against the momentum less what was sent. Decoded updates before sign to 1e-5 relative, after sign exactly
except where the update is within 1e-6 of zero.
"""

from __future__ import annotations

import pytest
import torch

from flexdemo import FlexDeMo
from flexdemo.chunks import ChunkLayout
from flexdemo.dct import dct2, dct_matrix, dct_matrix_halves, idct2
from flexdemo.ops import resolve_kernels
from flexdemo.ops.chunk_table import ChunkTable
from flexdemo.ops.decode_reference import decode_apply_reference, decode_mean
from flexdemo.ops.encode_reference import encode_reference, forward_dct

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from flexdemo.ops.decode import decode_apply_triton, decode_apply_triton_table  # noqa: E402
from flexdemo.ops.encode import _extract_candidates, encode_triton, encode_triton_table  # noqa: E402
from flexdemo.ops.options import SELECT_METHODS, KernelOptions  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(16, 16, 16), (37, 21, 16), (50, 70, 32)]
# The interpreter computes every tl.dot in fp32 whatever the precision, so only a GPU has two to test.
PRECISIONS = ["ieee", "tf32x3"] if DEVICE == "cuda" else ["ieee"]
# None: the kernels' defaults (encode: bf16x3 forward DCT and subtraction, ieee on CPU; decode: bf16x3 on both)
PRECISIONS_AND_DEFAULT = PRECISIONS + [None]


def opts(select: str = "rank", precision: str | None = None, **kw) -> KernelOptions:
    """precision None: the kernels' defaults; else every product in it."""
    return KernelOptions.all_in(precision, select=select, **kw) if precision else KernelOptions(select=select, **kw)


def run_encode(fn, grad, delta, lay, beta, lr, k, wire, bits=0, **kw):
    """(residual, values, indices), one row per chunk; with ``bits``, also (codes, scales)."""
    vals = torch.full((lay.num_chunks * k,), float("nan"), dtype=wire, device=DEVICE)
    idx = torch.full((lay.num_chunks * k,), -7, dtype=torch.int32, device=DEVICE)
    codes = torch.full((lay.num_chunks * k,), 255, dtype=torch.uint8, device=DEVICE)
    scales = torch.full((lay.num_chunks,), float("nan"), device=DEVICE)
    if bits:
        kw.update(bits=bits, out_codes=codes, out_scales=scales)
    d = delta.clone()
    fn(grad, d, lay, beta, lr, k, vals, idx, **kw)
    out = d, vals.view(-1, k), idx.view(-1, k)
    return out + (codes.view(-1, k), scales) if bits else out


@pytest.mark.parametrize("rows,cols,s", SHAPES)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999])
@pytest.mark.parametrize("select", SELECT_METHODS)
@pytest.mark.parametrize("precision", PRECISIONS_AND_DEFAULT)
def test_encode_matches_reference(rows, cols, s, k, beta, select, precision):
    torch.manual_seed(rows * 100 + k)
    lay = ChunkLayout(rows, cols, s)
    delta, grad = torch.randn(rows, cols, device=DEVICE), torch.randn(rows, cols, device=DEVICE)
    wire = torch.bfloat16
    d_ref, v_ref, i_ref = run_encode(encode_reference, grad, delta, lay, beta, 0.1, k, wire)
    d_tri, v_tri, i_tri = run_encode(encode_triton, grad, delta, lay, beta, 0.1, k, wire,
                                     options=opts(select, precision))
    assert (i_tri >= 0).all() and not v_tri.float().isnan().any()  # every slot written
    m = beta * delta + 0.1 * grad
    coeffs = dct2(lay.to_chunks(m)).reshape(lay.num_chunks, -1).abs()
    top = coeffs.sort(dim=1, descending=True).values
    bf16x3 = precision is None and DEVICE == "cuda"  # the default forward DCT: ~2^-15 of its terms' magnitudes
    clear = (top[:, k - 1] - top[:, k]) > (1e-3 if bf16x3 else 1e-5)
    assert clear.sum() >= lay.num_chunks // 2
    sent = torch.zeros(lay.num_chunks, s * s, device=DEVICE).scatter_(1, i_tri.long(), v_tri.float())
    kept = lay.to_chunks(lay.from_chunks(lay.to_chunks(m) - idct2(sent.view(-1, s, s))))  # m less what was sent
    for c in torch.nonzero(clear).flatten().tolist():
        assert set(i_tri[c].tolist()) == set(i_ref[c].tolist()), c
        order = i_ref[c].argsort()
        torch.testing.assert_close(v_tri[c][i_tri[c].argsort()].float(), v_ref[c][order].float(), rtol=1e-2, atol=1e-6)
        # the residual of that chunk (where the choices differ, so do the residuals, legitimately); a bf16x3
        # coefficient may round to the next bf16 value, so that residual is checked against what was sent
        torch.testing.assert_close(lay.to_chunks(d_tri)[c], kept[c] if bf16x3 else lay.to_chunks(d_ref)[c],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("select", SELECT_METHODS)
def test_encode_full_k_and_no_grad(select):
    s, k = 16, 256
    lay = ChunkLayout(20, 18, s)
    delta = torch.randn(20, 18, device=DEVICE)
    d_tri, v_tri, i_tri = run_encode(encode_triton, None, delta, lay, 0.5, 0.1, k, torch.float32, options=opts(select))
    assert d_tri.abs().max() < 1e-5  # everything sent: nothing left
    for c in range(lay.num_chunks):
        assert sorted(i_tri[c].tolist()) == list(range(s * s))
    back = decode_mean(i_tri.reshape(1, -1), v_tri.reshape(1, -1), lay, k)
    torch.testing.assert_close(back, 0.5 * delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("select", SELECT_METHODS)
def test_encode_tie_rule_is_lowest_index_first(select):
    """All-zero chunks (e.g. a shard's padding) tie everywhere: the kernel takes positions 0, 1, 2, ... in order.
    """
    lay = ChunkLayout(16, 40, 16)
    delta = torch.zeros(16, 40, device=DEVICE)
    delta[:, :16] = torch.randn(16, 16, device=DEVICE)  # chunk 0 live, chunks 1 and 2 all zero
    _, vals, idx = run_encode(encode_triton, None, delta, lay, 1.0, 0.0, 4, torch.float32, options=opts(select))
    assert idx[1].tolist() == [0, 1, 2, 3] and idx[2].tolist() == [0, 1, 2, 3]
    assert (vals[1:] == 0).all() and (vals[0] != 0).all()


@pytest.mark.parametrize("k,s", [(1, 16), (3, 16), (8, 16), (40, 16), (40, 128)])
@pytest.mark.parametrize("spectrum", ["flat", "few-rows"])
def test_topk_methods_agree_bit_for_bit(k, s, spectrum):
    """All selection methods pick the same set (same tie rule) from the same coefficients: the same (index, value)
    pairs bit for bit. Rank selection (2k <= s) and max-and-mask both write in descending magnitude (ties: lowest
    index first), so their payloads and residuals are identical, all-zero chunks included; bisection writes in index
    order, so its residual agrees to rounding.
    "few-rows": the energy sits in three rows of coefficients, so the k-th largest row maximum is a loose bound and
    rank selection must narrow it before ranking."""
    torch.manual_seed(k)
    lay = ChunkLayout(37 * s // 16, 50 * s // 16, s)  # s = 128: counts up to 16384 in the packed 16-bit fields
    delta = torch.randn(lay.rows, lay.cols, device=DEVICE)
    if spectrum == "few-rows":
        coef = torch.randn(lay.num_chunks, s, s, device=DEVICE) * 1e-3
        coef[:, :3] *= 1e4
        delta = lay.from_chunks(idct2(coef)).contiguous()
    grad = torch.randn(lay.rows, lay.cols, device=DEVICE).bfloat16()
    delta[:, 2 * s:] = 0.0  # whole zero chunks: ties at the cut
    grad[:, 2 * s:] = 0.0
    beta, lr = (1.0, 0.0) if spectrum == "few-rows" else (0.9, 0.1)
    # the forward DCT pinned to tf32x3: every method must see the same coefficients (with the bf16x3 default, one
    # near-tie of s = 128 fell differently between the methods' kernels on the H100)
    out = {m: run_encode(encode_triton, grad, delta, lay, beta, lr, k, torch.bfloat16,
                         options=opts(m, forward_precision="tf32x3")) for m in SELECT_METHODS}
    d_a, v_a, i_a = out["maxmask"]
    for m in ("rank", "bisect"):
        d_b, v_b, i_b = out[m]
        torch.testing.assert_close(d_a, d_b, rtol=1e-6, atol=1e-6 * max(1.0, delta.abs().max().item()))
        o_a, o_b = i_a.argsort(dim=1), i_b.argsort(dim=1)
        assert torch.equal(i_a.gather(1, o_a), i_b.gather(1, o_b))
        assert torch.equal(v_a.gather(1, o_a), v_b.gather(1, o_b))
    if 2 * k <= s:  # every chunk, the all-zero ones (the tie fallback) included
        d_b, v_b, i_b = out["rank"]
        assert torch.equal(i_a, i_b) and torch.equal(v_a, v_b)
        assert torch.equal(d_a, d_b)


@triton.jit
def _extract_probe(cb_ptr, lo, n_lo, row_ptr, n_ptr, S: tl.constexpr, K: tl.constexpr):
    si = tl.arange(0, S)
    tl.store(n_ptr, _extract_candidates(tl.load(cb_ptr + si[:, None] * S + si[None, :]), lo, n_lo, row_ptr, S, K))


def _naive_candidates(tile: torch.Tensor, k: int, s: int, bound: int):
    """What the rank selection hands to its ranking step (as a set): every coefficient at or above lo (the
    bound-th largest, bound >= k) when at most s are, else (lo is then the k-th largest) all above lo and the
    lowest-index ties, k in all."""
    bits = tile.flatten().view(torch.int32)
    mag = (bits & 0x7FFFFFFF).tolist()
    lo = sorted(mag, reverse=True)[bound - 1]
    n_lo = sum(m >= lo for m in mag)
    if n_lo <= s:
        keep = [i for i, m in enumerate(mag) if m >= lo]
    else:
        need = k - sum(m > lo for m in mag)
        ties = [i for i, m in enumerate(mag) if m == lo][:need]
        keep = sorted([i for i, m in enumerate(mag) if m > lo] + ties)
    return lo, n_lo, keep, bits


@pytest.mark.parametrize("case", ["distinct", "ties-beyond-s", "all-zero", "signed-ties", "one-row", "one-column"])
def test_candidate_extraction_takes_the_right_set(case):
    """Rank selection's candidate step on crafted tiles (handed over transposed, as the kernel holds C), against a
    naive list: the many-ties case (more than s at or above the k-th largest, only the lowest-index ones may go,
    spread over rows and columns) cannot be made through a DCT."""
    s, k = 16, 5
    g = torch.Generator().manual_seed(len(case))
    tile = torch.randn(s, s, generator=g)
    if case == "ties-beyond-s":
        tile = torch.full((s, s), 0.5)
        tile.view(-1)[torch.randperm(s * s, generator=g)[:200]] = 0.25  # below
        tile.view(-1)[[7, 40, 41, 200]] = 3.0  # above; the rest (52) tie at 0.5: one of them goes
    elif case == "all-zero":
        tile = torch.zeros(s, s)
    elif case == "signed-ties":
        tile = torch.full((s, s), 0.1) * torch.sign(torch.randn(s, s, generator=g))
        tile[3, 5] = -2.0
    elif case in ("one-row", "one-column"):  # all in one line; a column of C is a row of C^T: a round per candidate
        tile = torch.randn(s, s, generator=g) * 1e-3
        line = torch.arange(1, s + 1) * torch.sign(torch.randn(s, generator=g))
        if case == "one-row":
            tile[9] = line
        else:
            tile[:, 9] = line
    lo, n_lo, keep, bits = _naive_candidates(tile, k, s, 12 if case == "distinct" else k)  # 12: a loose bound
    row = torch.full((2 * s,), -1, dtype=torch.int64, device=DEVICE)
    n = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _extract_probe[(1,)](tile.t().contiguous().view(torch.int32).to(DEVICE), lo, n_lo, row, n, S=s, K=k)
    assert n.item() == len(keep)
    # each key (``_candidate_key``): |value| bits << 17 | (s*s - 1 - index) << 1 | sign
    got = sorted((s * s - 1 - ((p >> 1) & 0xFFFF), (p >> 17) | (p & 1) << 31) for p in row[:len(keep)].tolist())
    assert got == [(i, b & 0xFFFFFFFF) for i, b in zip(keep, bits[keep].tolist())]  # the values' bits, sign included


def random_payload(lay, k, replicas, wire):
    n = lay.num_chunks
    idx = torch.stack([torch.stack([torch.randperm(lay.s * lay.s)[:k] for _ in range(n)]).reshape(-1)
                       for _ in range(replicas)]).to(torch.int32).to(DEVICE)
    vals = (torch.randn(replicas, n * k) * 0.1).to(wire).to(DEVICE)
    return idx, vals


@pytest.mark.parametrize("rows,cols,s", SHAPES)
@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("precision", PRECISIONS_AND_DEFAULT)
def test_decode_matches_reference_before_sign(rows, cols, s, replicas, k, precision):
    torch.manual_seed(replicas * 10 + k)
    lay = ChunkLayout(rows, cols, s)
    idx, vals = random_payload(lay, k, replicas, torch.bfloat16)
    p0 = torch.randn(rows, cols, device=DEVICE)
    a, b = p0.clone(), p0.clone()
    decode_apply_reference(a, idx, vals, lay, k, lr=1.0, decay=0.99, sign=False)
    decode_apply_triton(b, idx, vals, lay, k, lr=1.0, decay=0.99, sign=False, options=opts(precision=precision))
    update = (a - 0.99 * p0).abs().max().item()  # bf16x3: each factor to 16 significant bits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 if precision else 2.0 ** -14 * update)


@pytest.mark.parametrize("wire", [torch.float32, torch.float16])
def test_decode_accuracy_for_fp32_and_fp16_values(wire):
    """Wire values of any precision decode to ~2^-16 by default: the products value x basis run as three bf16
    products (each factor kept to 16 significant bits), not in one tf32 pass, which would keep 11."""
    torch.manual_seed(11)
    lay = ChunkLayout(37, 21, 16)
    idx, vals = random_payload(lay, 7, 2, wire)
    a, b = torch.zeros(37, 21, device=DEVICE), torch.zeros(37, 21, device=DEVICE)
    decode_apply_reference(a, idx, vals, lay, 7, lr=1.0, decay=1.0, sign=False)
    decode_apply_triton(b, idx, vals, lay, 7, lr=1.0, decay=1.0, sign=False)
    torch.testing.assert_close(b, a, rtol=0, atol=2.0 ** -14 * a.abs().max().item())


@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("precision,bits", [("tf32", 9), (None, 14)])
def test_decode_is_within_its_stated_tolerance(sign, precision, bits):
    """``dct_inverse=tf32``: one tf32 pass rounds each basis factor to 11 significant bits (bf16 wire values are exact
    in tf32; value / count too for counts 1 and 2), so each term w D[u, x] D[v, y] is off by <= ~2^-10 of its
    magnitude and the update by <= 2^-9 x T, T the same sum with every factor's magnitude (checked per element).
    The default (bf16x3: 16 significant bits per factor) by <= 2^-14 x T. After sign, elements may differ only
    where the update is within that bound of zero."""
    torch.manual_seed(12)
    lay, k = ChunkLayout(128, 192, 64), 32  # whole chunks: dct2 of a decoded update gives its coefficients back
    idx, vals = random_payload(lay, k, 2, torch.bfloat16)
    a, b = torch.zeros(128, 192, device=DEVICE), torch.zeros(128, 192, device=DEVICE)
    decode_apply_reference(a, idx, vals, lay, k, lr=1.0, decay=1.0, sign=sign)
    decode_apply_triton(b, idx, vals, lay, k, lr=1.0, decay=1.0, sign=sign, options=opts(precision=precision))
    mean = decode_mean(idx, vals, lay, k)
    d = dct_matrix(64, DEVICE).abs()
    w = dct2(lay.to_chunks(decode_mean(idx, vals.abs(), lay, k))).abs()  # per position: the sum of |w| sent there
    terms = lay.from_chunks(d.T @ w @ d)
    bound = 2.0 ** -bits * terms
    if sign:
        assert torch.equal(a[mean.abs() > bound], b[mean.abs() > bound])
    else:
        assert ((a - b).abs() <= bound).all()


def test_dct_matrix_halves_split_the_basis_to_16_bits():
    d = dct_matrix(64, DEVICE)
    hi, lo = dct_matrix_halves(64, DEVICE)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi, d.to(torch.bfloat16))  # nearest, then the rest of D nearest again
    assert ((hi.double() + lo.double() - d.double()).abs() <= 2.0 ** -17 * d.double().abs()).all()


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_decode_default_is_the_bf16x3_decomposition_everywhere(replicas):
    """The default decode multiplies D's bf16 halves by w * D[row] split to nearest even (hi, lo): D_hi b_lo + D_lo
    b_hi + D_hi b_hi, lo x lo left out, on the GPU and in the interpreter alike (so the CPU tests run the GPU's
    arithmetic). Its update equals that decomposition computed here in float64 up to fp32 accumulation and the fast
    division (< 2e-6 of the largest entry), and differs from the exact update by more (the left-out terms)."""
    torch.manual_seed(21 + replicas)
    lay, k, s = ChunkLayout(64, 128, 64), 32, 64
    idx, vals = random_payload(lay, k, replicas, torch.bfloat16)
    out = torch.zeros(64, 128, device=DEVICE)
    decode_apply_triton(out, idx, vals, lay, k, lr=1.0, decay=0.0, sign=False)
    d = dct_matrix(s, DEVICE)
    hi, lo = (h.double() for h in dct_matrix_halves(s, DEVICE))
    emulated = torch.zeros(lay.num_chunks, s, s, dtype=torch.float64, device=DEVICE)
    for c in range(lay.num_chunks):
        chunk_idx = idx[:, c * k:(c + 1) * k].long()
        for r in range(replicas):
            count = (chunk_idx[r][:, None, None] == chunk_idx[None, :, :]).sum((1, 2)).float()
            w = vals[r, c * k:(c + 1) * k].float() / count
            b = w[:, None] * d[chunk_idx[r] // s]  # fp32, as the kernel forms it
            b_hi = b.to(torch.bfloat16).double()
            b_lo = (b - b_hi.float()).to(torch.bfloat16).double()
            rows = chunk_idx[r] % s
            emulated[c] += hi[rows].T @ b_lo + lo[rows].T @ b_hi + hi[rows].T @ b_hi  # transposed tile
    emulated = lay.from_chunks(emulated.transpose(1, 2))
    exact = decode_mean(idx, vals, lay, k).double()
    scale = exact.abs().max()
    assert (-out.double() - emulated).abs().max() < 2e-6 * scale
    assert (exact - emulated).abs().max() > 3e-6 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("replicas, lr", [(1, 0.01), (3, 0.01), (2, -1.0)])  # -1: how a base step reads the direction
def test_decode_apply_with_sign_and_param_dtypes(dtype, replicas, lr):
    torch.manual_seed(5)
    lay = ChunkLayout(37, 21, 16)
    idx, vals = random_payload(lay, 5, replicas, torch.bfloat16)
    p0 = torch.randn(37, 21, device=DEVICE).to(dtype)
    a, b = p0.clone(), p0.clone()
    decode_apply_reference(a, idx, vals, lay, 5, lr=lr, decay=0.999, sign=True)
    decode_apply_triton(b, idx, vals, lay, 5, lr=lr, decay=0.999, sign=True)
    near_zero = decode_mean(idx, vals, lay, 5).abs() < 1e-6
    assert b.dtype == dtype
    # A GPU contracts p * decay - lr * u into one FMA, one rounding fewer than torch's three ops, so the two may differ
    # by the fp32 rounding of the operands (2 ulps of |p| + lr, whatever cancellation leaves) plus one ulp of the
    # parameter's dtype. The interpreter does not contract: there they agree bit for bit.
    bound = torch.finfo(dtype).eps * a.float().abs() + 2 * torch.finfo(torch.float32).eps * (p0.float().abs() + abs(lr))
    err = (b.float() - a.float()).abs()
    assert (err <= bound)[~near_zero].all(), (err - bound).max()
    if DEVICE == "cpu":
        assert torch.equal(a[~near_zero], b[~near_zero])


@pytest.mark.parametrize("replicas, base_step, rule", [(1, "direct", {}), (2, "direct", {}), (3, "direct", {}),
                                                      (2, "adam", {}), (2, "adam", {"sign": True}),
                                                      (2, "direct", {"sign": True, "tensor_scale": "adam_rms"}),
                                                      (2, "direct", {"precondition": "adam"}),
                                                      (2, "orthogonal", {"orthogonal_scope": "chunk"}),
                                                      (2, "coefficient_sign", {}),
                                                      (2, "coefficient_sign", {"value_bits": 1,
                                                                               "index_coding": "elias_fano"})])
def test_optimizer_triton_path_matches_torch_path_and_keeps_replicas_identical(replicas, base_step, rule):
    torch.manual_seed(0)
    shapes = [(37, 21), (32, 48), (9,)]
    init = [torch.randn(s, device=DEVICE) * 0.1 for s in shapes]
    opts = {}
    for kernels in ("torch", "triton"):
        reps = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(replicas)]
        opts[kernels] = (reps, [FlexDeMo(ps, lr=0.01, chunk=16, topk=6, beta=0.9, weight_decay=0.1,
                                         kernels=kernels, base_step=base_step, **{"sign": False, **rule})
                                for ps in reps])
    for step in range(3):
        grads = [[torch.randn(s, device=DEVICE) for s in shapes] for _ in range(replicas)]
        for reps, os_ in opts.values():
            for ps, gs in zip(reps, grads):
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
            gathered = torch.stack([o.encode() for o in os_])
            for o in os_:
                o.decode_apply(gathered)
    (t_reps, t_opts), (k_reps, k_opts) = opts["torch"], opts["triton"]
    assert k_opts[0].kernels == "triton" and t_opts[0].kernels == "torch"
    for r in range(replicas):
        for p, q in zip(t_reps[r], k_reps[r]):
            if base_step == "adam" and DEVICE == "cuda":
                # Adam divides the direction by its own RMS history, so a direction within the GPU kernels' ~2^-16
                # rounding of zero can come out with either sign (on the H200: 1 element of 1536): those few may
                # differ by up to lr per step, every other one as tightly as the direct step
                close = torch.isclose(q, p, rtol=1e-4, atol=1e-6)
                assert close.float().mean() >= 0.99 and ((q - p).abs() <= 3 * 0.01 * 1.01).all()
            elif base_step == "orthogonal":  # five fp32 Newton-Schulz rounds: ~1e-4 of the step (0.008)
                torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
        for p, q in zip(k_reps[0], k_reps[r]):
            assert torch.equal(p, q)


def test_one_table_launch_equals_one_launch_per_tensor():
    """Encode and decode + apply over a ChunkTable of odd shapes (chunk counts 1..12, a tensor without gradient, a
    strided row view, payload places out of order with gaps) give the same bits as one launch per tensor."""
    torch.manual_seed(21)
    s, k = 16, 5
    shapes = [(37, 21), (16, 16), (5, 70), (50, 33)]
    lays = [ChunkLayout(r, c, s) for r, c in shapes]
    firsts = [9, 0, 4, 20]  # 6, 1, 5 and 12 chunks: tensor 1 first, gaps at 1..3 and 15..19; 32 payload chunks
    table = ChunkTable.build(lays, firsts, k, torch.device(DEVICE))
    assert table.num_chunks == sum(lay.num_chunks for lay in lays) == 24
    wide = torch.randn(50, 40, device=DEVICE)
    grads = [torch.randn(r, c, device=DEVICE) for r, c in shapes]
    grads[1], grads[3] = None, wide[:, :33]  # no gradient; rows of stride 40
    deltas = [torch.randn(r, c, device=DEVICE) for r, c in shapes]
    n = 32 * k
    one = ([d.clone() for d in deltas], torch.zeros(n, dtype=torch.bfloat16, device=DEVICE),
           torch.full((n,), -1, dtype=torch.int32, device=DEVICE))
    each = ([d.clone() for d in deltas], one[1].clone(), one[2].clone())
    encode_triton_table(table, grads, one[0], 0.9, 0.1, one[1], one[2])
    for t, (lay, g, d) in enumerate(zip(lays, grads, each[0])):
        sl = table.payload_slice(t)
        assert sl == slice(firsts[t] * k, (firsts[t] + lay.num_chunks) * k)
        encode_triton(g, d, lay, 0.9, 0.1, k, each[1][sl], each[2][sl])
    for a, b in zip(one[0], each[0]):
        assert torch.equal(a, b)
    assert torch.equal(one[1], each[1]) and torch.equal(one[2], each[2])
    assert (one[2][k : 4 * k] == -1).all() and (one[2][15 * k : 20 * k] == -1).all()  # the gaps are left alone
    assert (one[2][: k] >= 0).all() and (one[2][4 * k : 15 * k] >= 0).all() and (one[2][20 * k :] >= 0).all()
    idx, vals = random_payload(ChunkLayout(32 * s, s, s), k, 2, torch.bfloat16)  # 32 chunks of payload, 2 replicas
    params = [torch.randn(r, c, device=DEVICE).to(dt) for (r, c), dt in zip(shapes, [torch.float32] * 4)]
    p_one, p_each = [p.clone() for p in params], [p.clone() for p in params]
    decode_apply_triton_table(table, p_one, idx, vals, lr=0.01, decay=0.99, sign=True)
    for t, (lay, p) in enumerate(zip(lays, p_each)):
        sl = table.payload_slice(t)
        decode_apply_triton(p, idx[:, sl], vals[:, sl], lay, k, lr=0.01, decay=0.99, sign=True)
    for a, b in zip(p_one, p_each):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sign", [True, False])
def test_rates_read_from_device_memory_give_the_same_bits(sign):
    """lr (encode) and lr, decay (decode) as one-element fp32 tensors, read by the kernels at run time (what a
    captured CUDA graph replays), give the same bits as the same rates passed as floats; bad rate tensors refused."""
    torch.manual_seed(5)
    s, k = 16, 5
    shapes = [(37, 21), (16, 16)]
    lays = [ChunkLayout(r, c, s) for r, c in shapes]
    table = ChunkTable.build(lays, [0, 6], k, torch.device(DEVICE))
    grads = [torch.randn(r, c, device=DEVICE) for r, c in shapes]
    deltas = [torch.randn(r, c, device=DEVICE) for r, c in shapes]
    lr, decay = 0.0123, 0.9871
    on_device = torch.tensor([lr, decay], device=DEVICE)
    outs = []
    for rate in (lr, on_device[0]):
        d = [x.clone() for x in deltas]
        vals = torch.zeros(7 * k, dtype=torch.bfloat16, device=DEVICE)
        idx = torch.zeros(7 * k, dtype=torch.int32, device=DEVICE)
        encode_triton_table(table, grads, d, 0.9, rate, vals, idx)
        outs.append((d, vals, idx))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    idx, vals = random_payload(ChunkLayout(7 * s, s, s), k, 2, torch.bfloat16)
    params = [torch.randn(r, c, device=DEVICE) for r, c in shapes]
    by_float, by_tensor = [p.clone() for p in params], [p.clone() for p in params]
    decode_apply_triton_table(table, by_float, idx, vals, lr=lr, decay=decay, sign=sign)
    decode_apply_triton_table(table, by_tensor, idx, vals, lr=on_device[0], decay=on_device[1], sign=sign)
    for a, b, p in zip(by_float, by_tensor, params):
        assert torch.equal(a, b) and not torch.equal(a, p)
    with pytest.raises(ValueError, match="one fp32 element; got torch.float32 of shape \\(2,\\)"):
        encode_triton_table(table, grads, deltas, 0.9, on_device, vals[0], idx[0])
    with pytest.raises(ValueError, match="both be floats or both be tensors"):
        decode_apply_triton_table(table, by_float, idx, vals, lr=on_device[0], decay=decay, sign=sign)


def test_chunk_table_rejects_bad_input_before_launch():
    lays = [ChunkLayout(20, 20, 16), ChunkLayout(8, 8, 16)]
    with pytest.raises(ValueError, match="a ChunkTable needs at least one tensor"):
        ChunkTable.build([], [], 16, torch.device(DEVICE))
    with pytest.raises(ValueError, match="2 layouts but 1 payload offsets"):
        ChunkTable.build(lays, [0], 16, torch.device(DEVICE))
    with pytest.raises(ValueError, match=r"one chunk size per table; got \[16, 32\]"):
        ChunkTable.build([lays[0], ChunkLayout(8, 8, 32)], [0, 4], 16, torch.device(DEVICE))
    with pytest.raises(ValueError, match=r"k=257 must be in \[1, s\*s=256\]"):
        ChunkTable.build(lays, [0, 4], 257, torch.device(DEVICE))
    table = ChunkTable.build(lays, [0, 4], 16, torch.device(DEVICE))
    with pytest.raises(ValueError, match=r"tensor 1: shape \(8, 9\).*wants \(8, 8\)"):
        table.addresses([torch.zeros(20, 20), torch.zeros(8, 9)])
    with pytest.raises(ValueError, match=r"tensor 0: shape \(20, 20\) stride \(1, 20\)"):  # column-major
        table.addresses([torch.zeros(20, 20).t(), torch.zeros(8, 8)])
    # a contiguous tensor of rows * cols elements is taken as its (rows, cols) view; another size is refused
    flat = [torch.zeros(400, device=DEVICE), torch.zeros(2, 4, 8, device=DEVICE)]
    assert table.addresses(flat).tolist() == [[flat[0].data_ptr(), 20], [flat[1].data_ptr(), 8]]
    with pytest.raises(ValueError, match=r"tensor 1: shape \(65,\).*or a contiguous tensor of 64 elements"):
        table.addresses([flat[0], torch.zeros(65)])
    zeros = [torch.zeros(20, 20, device=DEVICE), torch.zeros(8, 8, device=DEVICE)]
    # the address table of tensors where they were before is the one already on the device; any move, a new one
    first = table.addresses(zeros)
    assert first.tolist() == [[z.data_ptr(), z.stride(0)] for z in zeros] and table.addresses(zeros) is first
    moved = [zeros[0], torch.zeros(8, 8, device=DEVICE)]
    assert table.addresses(moved).tolist() == [[z.data_ptr(), z.stride(0)] for z in moved]
    assert table.addresses(zeros, moved) is not first and table.addresses(zeros) is first
    out = torch.zeros(5 * 16, device=DEVICE), torch.zeros(5 * 16, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"one gradient dtype per launch; got \['torch.bfloat16', 'torch.float32'\]"):
        encode_triton_table(table, [zeros[0], zeros[1].bfloat16()], zeros, 0.9, 0.1, *out)
    with pytest.raises(ValueError, match="one parameter dtype per launch"):
        mixed = [torch.zeros(20, 20, device=DEVICE), torch.zeros(8, 8, device=DEVICE).bfloat16()]
        decode_apply_triton_table(table, mixed,
                                  torch.zeros(1, 5 * 16, dtype=torch.int32, device=DEVICE),
                                  torch.zeros(1, 5 * 16, device=DEVICE), 0.1, 1.0, True)


@pytest.mark.parametrize("field,value,allowed", [
    ("select", "sort", "rank, bisect, maxmask"), ("forward_precision", "fp16", "ieee, tf32, tf32x3, bf16x3, bf16"),
    ("subtract_precision", None, "ieee, tf32"), ("decode_precision", "fp32", "ieee, tf32"),
    ("encode_warps", 3, "1, 2, 4, 8, 16"), ("decode_warps", 0, "1, 2, 4, 8, 16"),
])
def test_bad_kernel_options_are_rejected_when_built(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}={value!r}; allowed: {allowed}".replace("(", r"\(")):
        KernelOptions(**{field: value})


def test_kernel_choice():
    assert resolve_kernels("torch", torch.device("cpu"), 64) == "torch"
    assert resolve_kernels("auto", torch.device("cpu"), 64) == "torch"
    with pytest.raises(ValueError, match="chunk=24 is not one of"):
        resolve_kernels("triton", torch.device(DEVICE), 24)
    with pytest.raises(ValueError, match="kernels='cuda'"):
        resolve_kernels("cuda", torch.device("cpu"), 64)


def test_default_settings_64x64_k32_bf16_gradients_and_parameters():
    """The defaults (64 x 64 tiles, k = 32, bf16 wire) on a ragged 70 x 130 shard with bf16 gradient and parameter."""
    torch.manual_seed(3)
    lay, k = ChunkLayout(70, 130, 64), 32
    grad = torch.randn(70, 130, device=DEVICE).bfloat16()
    delta = torch.randn(70, 130, device=DEVICE)
    d_ref, v_ref, i_ref = run_encode(encode_reference, grad, delta, lay, 0.999, 1e-4, k, torch.bfloat16)
    d_tri, v_tri, i_tri = run_encode(encode_triton, grad, delta, lay, 0.999, 1e-4, k, torch.bfloat16)
    same = [c for c in range(lay.num_chunks) if set(i_tri[c].tolist()) == set(i_ref[c].tolist())]
    assert len(same) == lay.num_chunks  # random data: no near-ties at the cut
    torch.testing.assert_close(d_tri, d_ref, rtol=1e-5, atol=1e-5)
    p = torch.randn(70, 130, device=DEVICE).bfloat16()
    a, b = p.clone(), p.clone()
    idx, vals = i_tri.reshape(1, -1).repeat(2, 1), v_tri.reshape(1, -1).repeat(2, 1)
    decode_apply_reference(a, idx, vals, lay, k, lr=1e-4, decay=1.0, sign=True)
    decode_apply_triton(b, idx, vals, lay, k, lr=1e-4, decay=1.0, sign=True)
    mean = decode_mean(idx, vals, lay, k).abs()
    near_zero = mean < 1e-5 * mean.max()  # the sign of a near-zero update depends on the DCT's last rounding
    assert torch.equal(a[~near_zero], b[~near_zero])


@pytest.mark.parametrize("precision,tol", [("tf32", 1e-2), ("bf16", 3e-2)])
def test_one_pass_forward_dct_still_keeps_the_momentum_consistent(precision, tol):
    """A one-pass tf32 (bf16) forward DCT moves coefficients by ~1e-3 (~4e-3) relative: it may choose another
    near-tie and send a slightly different value, but the momentum still loses exactly what was sent."""
    torch.manual_seed(9)
    lay, k = ChunkLayout(70, 130, 64), 32
    delta, grad = torch.randn(70, 130, device=DEVICE), torch.randn(70, 130, device=DEVICE)
    d_new, vals, idx = run_encode(encode_triton, grad, delta, lay, 0.9, 0.1, k, torch.float32,
                                  options=KernelOptions(forward_precision=precision))
    m = 0.9 * delta + 0.1 * grad
    sent = torch.zeros(lay.num_chunks, 64 * 64, device=DEVICE).scatter_(1, idx.long(), vals.float())
    torch.testing.assert_close(d_new, m - lay.from_chunks(idct2(sent.view(-1, 64, 64))), rtol=1e-5, atol=1e-5)
    coeffs = dct2(lay.to_chunks(m)).reshape(lay.num_chunks, -1)
    kth = coeffs.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
    assert (coeffs.abs().gather(1, idx.long()) >= kth * (1 - tol)).all()
    torch.testing.assert_close(vals.float(), coeffs.gather(1, idx.long()), rtol=tol, atol=tol * kth.min().item())


@pytest.mark.parametrize("rows,cols,s,k", [(70, 130, 64, 32), (37, 50, 16, 5), (33, 70, 32, 8)])
@pytest.mark.parametrize("bits", [0, 2])
def test_one_pass_bf16_forward_dct_matches_its_torch_twin(rows, cols, s, k, bits):
    """``dct_forward=bf16``: the kernel and ``encode_reference(forward="bf16")`` round the same factors (the torch
    path's twin, which CPU training runs use), so where the k-th and (k+1)-th magnitudes are apart by more than the
    summation order can move them, they send the same coefficients and codes and leave the same momentum (which
    the fp32 transform's payload is not)."""
    torch.manual_seed(rows + k)
    lay = ChunkLayout(rows, cols, s)
    delta, grad = torch.randn(rows, cols, device=DEVICE), torch.randn(rows, cols, device=DEVICE)
    ref = run_encode(encode_reference, grad, delta, lay, 0.9, 0.1, k, torch.bfloat16, bits, forward="bf16")
    tri = run_encode(encode_triton, grad, delta, lay, 0.9, 0.1, k, torch.bfloat16, bits,
                     options=KernelOptions(forward_precision="bf16"))
    fp32 = run_encode(encode_reference, grad, delta, lay, 0.9, 0.1, k, torch.bfloat16, bits)
    m = lay.to_chunks(0.9 * delta + 0.1 * grad)
    top = forward_dct(m, "bf16").reshape(lay.num_chunks, -1).abs().sort(dim=1, descending=True).values
    clear = (top[:, k - 1] - top[:, k]) > 1e-4 * top[:, 0]
    assert clear.sum() >= lay.num_chunks // 2
    chosen = [set(i.tolist()) for i in ref[2]]
    assert not (torch.equal(ref[1], fp32[1]) and torch.equal(ref[2], fp32[2]))  # the rounding matters
    for c in torch.nonzero(clear).flatten().tolist():
        assert set(tri[2][c].tolist()) == chosen[c], c
        o_tri, o_ref = tri[2][c].argsort(), ref[2][c].argsort()
        torch.testing.assert_close(tri[1][c][o_tri].float(), ref[1][c][o_ref].float(), rtol=1e-2, atol=1e-6)
        if bits:
            assert torch.equal(tri[3][c][o_tri], ref[3][c][o_ref]) and tri[4][c] == ref[4][c]
        torch.testing.assert_close(lay.to_chunks(tri[0])[c], lay.to_chunks(ref[0])[c], rtol=1e-5, atol=1e-5)


def test_torch_path_takes_the_one_pass_forward_dct_it_is_asked_for():
    """On the torch path (CPU runs) ``dct_forward=bf16`` leaves the momentum ``encode_reference(forward="bf16")``
    leaves, not the fp32 one."""
    torch.manual_seed(3)
    init, grad = torch.randn(70, 130, device=DEVICE) * 0.1, torch.randn(70, 130, device=DEVICE)
    lay, k = ChunkLayout(70, 130, 64), 32
    moms = {}
    for fwd in ("fp32", "bf16"):
        p = torch.nn.Parameter(init.clone())
        p.grad = grad.clone()
        opt = FlexDeMo([p], lr=0.01, chunk=64, topk=k, value_bits=0, index_coding="fixed", kernels="torch",
                       dct_forward=fwd)
        opt.step()
        moms[fwd] = opt.state[p]["delta"].view(70, 130)
    for fwd, forward in (("fp32", None), ("bf16", "bf16")):
        d, _, _ = run_encode(encode_reference, grad, torch.zeros_like(grad), lay, opt.cfg.beta, 0.01, k,
                             torch.bfloat16, forward=forward)
        assert torch.equal(moms[fwd], d), fwd
    assert not torch.equal(moms["fp32"], moms["bf16"])


def test_optimizer_one_launch_with_mixed_gradient_dtypes_and_a_missing_gradient():
    """Gradients of two dtypes in one table (read as fp32 in one launch) and one parameter without a gradient give
    the torch path's result."""
    torch.manual_seed(4)
    shapes = [(37, 21), (32, 48), (20, 20)]
    init = [torch.randn(s, device=DEVICE) * 0.1 for s in shapes]
    grads = [torch.randn(shapes[0], device=DEVICE).bfloat16(), torch.randn(shapes[1], device=DEVICE), None]
    out = {}
    for kernels in ("torch", "triton"):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        if hasattr(ps[0], "grad_dtype"):  # torch >= 2.10 checks a gradient's dtype unless told not to
            ps[0].grad_dtype = None
        opt = FlexDeMo(ps, lr=0.01, chunk=16, topk=6, beta=0.9, weight_decay=0.1, sign=False, kernels=kernels)
        for _ in range(2):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
            opt.step()
        out[kernels] = ps
    for p, q in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    assert not torch.equal(out["triton"][2], init[2])  # no gradient: still decays and moves with its momentum


def test_default_forward_dct_follows_the_wire():
    """dct_forward=fp32 means products finer than the wire: bf16x3 (~2^-16) for a 16-bit wire, tf32x3 (~2^-21) for an
    fp32 wire, whose values keep 24 bits (``test_encode_full_k_and_no_grad`` sends everything in fp32 and needs it)."""
    from flexdemo.ops.encode import _launch_options
    from flexdemo.ops.precision import runnable

    for wire, expected in [(torch.bfloat16, "bf16x3"), (torch.float16, "bf16x3"), (torch.float32, "tf32x3")]:
        assert _launch_options(KernelOptions(), 32, 64, wire)["FWD_PRECISION"] == runnable(expected)
    assert _launch_options(KernelOptions(forward_precision="tf32"), 32, 64, torch.float32)["FWD_PRECISION"] == "tf32"


@pytest.mark.parametrize("setting,module,launch_fn,kwarg,expected", [
    ("dct_forward", "encode", "encode_triton_table", "forward_precision", {"fp32": None, "tf32": "tf32",
                                                                             "bf16": "bf16"}),
    ("dct_inverse", "decode", "decode_apply_triton_table", "decode_precision", {"fp32": "bf16x3", "tf32": "tf32"}),
])
def test_dct_precision_settings_reach_their_launch_and_bad_values_are_rejected(monkeypatch, setting, module, launch_fn,
                                                                              kwarg, expected):
    """``dct_forward=tf32`` / ``bf16`` asks the Triton encode for a one-pass forward DCT (fp32: None, its default for
    the wire), ``dct_inverse=tf32`` the decode for one tf32 pass (fp32: three bf16 products); both are checked when
    the config is built, also through flexmore's optim config."""
    import importlib

    from flexdemo import DeMoConfig
    from flexmore.config import OptimConfig

    allowed = "fp32, tf32, bf16" if setting == "dct_forward" else "fp32, tf32"
    with pytest.raises(ValueError, match=f"{setting}='fp16'; allowed: {allowed}"):
        DeMoConfig(**{setting: "fp16"})
    assert getattr(OptimConfig(name="flexdemo", demo=DeMoConfig(**{setting: "tf32"})).demo_config(), setting) == "tf32"
    mod = importlib.import_module(f"flexdemo.ops.{module}")
    seen, launch = [], getattr(mod, launch_fn)
    def spy(*a, **kw):  # the launch's KernelOptions, wherever it sits among the arguments
        seen.append(getattr(next(x for x in a if isinstance(x, KernelOptions)), kwarg))
        return launch(*a, **kw)

    monkeypatch.setattr(mod, launch_fn, spy)
    for value in expected:
        p = torch.nn.Parameter(torch.randn(20, 24, device=DEVICE))
        p.grad = torch.randn(20, 24, device=DEVICE)
        FlexDeMo([p], lr=0.01, chunk=16, topk=4, kernels="triton", **{setting: value}).step()
    assert seen == list(expected.values())


def test_quantised_payload_on_the_triton_path_keeps_what_the_codes_lose():
    """value_bits=4 after the Triton encode: residual + decoded update = lr x gradient, as on the torch path."""
    torch.manual_seed(0)
    init, grad = torch.randn(40, 48, device=DEVICE), torch.randn(40, 48, device=DEVICE)
    p = torch.nn.Parameter(init.clone())
    p.grad = grad.clone()
    opt = FlexDeMo([p], lr=0.1, base_step="direct", chunk=16, topk=6, beta=0.9, sign=False, value_bits=4,
                   kernels="triton")
    opt.step()
    torch.testing.assert_close(opt.state[p]["delta"] + (init - p.detach()) / 0.1, 0.1 * grad, rtol=1e-4, atol=1e-4)


def naive_orthogonal_update(idx, vals, lay, k, mean):
    """float64, the long way: each chunk's mean coefficients, the whole decoded s x s chunk D^T M D, the quintic
    Newton-Schulz iteration on it (not on M: the kernel's shortcut is what this checks), cropped."""
    from conftest import naive_orthogonal

    s, n, replicas = lay.s, lay.num_chunks, idx.shape[0]
    d = dct_matrix(s, "cpu", torch.float64)
    out = torch.zeros(n, s, s, dtype=torch.float64)
    for c in range(n):
        total, count = torch.zeros(s * s, dtype=torch.float64), torch.zeros(s * s, dtype=torch.float64)
        for r in range(replicas):
            for j in range(k):
                total[int(idx[r, c * k + j])] += float(vals[r, c * k + j])
                count[int(idx[r, c * k + j])] += 1
        m = (total / (replicas if mean == "all" else count.clamp(min=1))).view(s, s)
        out[c] = naive_orthogonal(d.T @ m @ d)
    return lay.from_chunks(out)


@pytest.mark.parametrize("replicas, precision, mean", [(1, "fp32", "senders"), (2, "fp32", "senders"),
                                                       (3, "fp32", "all"), (1, "bf16", "senders"),
                                                       (2, "bf16", "senders")])
def test_decode_orthogonal_matches_the_step_of_the_decoded_chunk_and_its_twin(replicas, precision, mean):
    """base_step=orthogonal, orthogonal_scope=chunk in one launch over a table of odd-shaped tensors (ragged edge
    chunks, a strided view, replicas sharing positions, a chunk nobody sent into): fp32 against the float64 step of
    each whole decoded chunk and against the twin, to fp32 rounding; bf16 within 5% of that step and of the twin
    (bf16's rounding of the iterate, on M's sent rows and columns only); the rest of a strided buffer untouched."""
    from flexdemo.ops.decode_orthogonal import decode_orthogonal_apply_triton_table
    from flexdemo.ops.decode_orthogonal_reference import decode_orthogonal_apply_reference

    torch.manual_seed(replicas)
    s, k, lr, decay = 16, 6, 0.5, 0.9
    shapes = [(37, 21), (16, 16), (5, 40)]
    layouts = [ChunkLayout(r, c, s) for r, c in shapes]
    table = ChunkTable.build(layouts, [0, 6, 7], k, torch.device(DEVICE))
    idx, vals = overlapping_payload(ChunkLayout(table.num_chunks * s, s, s), k, replicas, torch.float32)
    vals[:, 7 * k : 8 * k] = 0  # tensor 2's first chunk: nothing sent (a zero step)
    init = [torch.randn(r, c) for r, c in shapes]
    wide = torch.randn(37, 30)
    wide[:, :21] = init[0]
    got = [wide.clone().to(DEVICE)] + [x.clone().to(DEVICE) for x in init[1:]]
    targets = [got[0][:, :21]] + got[1:]
    decode_orthogonal_apply_triton_table(table, targets, idx, vals, lr, decay, precision, mean)
    for t, (lay, x, p0) in enumerate(zip(layouts, targets, init)):
        sl = table.payload_slice(t)
        twin = p0.clone().to(DEVICE)
        decode_orthogonal_apply_reference(twin, idx[:, sl], vals[:, sl], lay, k, lr, decay, precision, mean)
        naive = p0.double() * decay - lr * naive_orthogonal_update(idx[:, sl].cpu(), vals[:, sl].cpu(), lay, k, mean)
        step = float((naive - p0.double() * decay).norm())
        for name, y in (("kernel", x), ("twin", twin)):
            err = float((y.cpu().double() - naive).norm()) / step
            assert err < (2e-5 if precision == "fp32" else 0.08), (name, t, err)
        if precision == "fp32":
            torch.testing.assert_close(x.cpu(), twin.cpu(), rtol=1e-5, atol=2e-6)
    assert got[0][:, 21:].cpu().equal(wide[:, 21:])
    assert targets[2][:, :s].cpu().equal(init[2][:, :s] * decay)  # nothing sent there: only the decay
    with pytest.raises(ValueError, match="precision='fp16'; allowed: fp32, bf16"):
        decode_orthogonal_apply_triton_table(table, targets, idx, vals, lr, decay, "fp16", mean)
    sl = table.payload_slice(1)
    with pytest.raises(ValueError, match="precision='fp16'; allowed: fp32, bf16"):
        decode_orthogonal_apply_reference(targets[1], idx[:, sl], vals[:, sl], layouts[1], k, lr, decay, "fp16")
    with pytest.raises(ValueError, match=r"one parameter dtype per launch; got \['torch.bfloat16', 'torch.float32'\]"):
        decode_orthogonal_apply_triton_table(table, [targets[0].bfloat16(), *targets[1:]], idx, vals, lr, decay,
                                             precision, mean)


def overlapping_payload(lay, k, replicas, wire):
    """random_payload, with each replica's first k // 2 positions of every chunk also sent by replica 0."""
    idx, vals = random_payload(lay, k, replicas, wire)
    for c in range(lay.num_chunks):
        first = idx[0, c * k:(c + 1) * k].tolist()
        for r in range(1, replicas):
            rest = [j for j in torch.randperm(lay.s * lay.s).tolist() if j not in first[: k // 2]][: k - k // 2]
            idx[r, c * k:(c + 1) * k] = torch.tensor(first[: k // 2] + rest, dtype=torch.int32)
    return idx, vals


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("mean", ["senders", "all"])
def test_decode_coefficient_sign(replicas, mean):
    """base_step=coefficient_sign: each chunk's mean coefficients replaced by their signs, then decoded. The reference
    equals a float64 dense decode of the signs built here (a position whose replicas' values cancel exactly: 0); the
    kernel (one tensor, and a ChunkTable) equals the reference, whichever mean."""
    torch.manual_seed(40 + replicas)
    lay, k = ChunkLayout(37, 45, 16), 6
    idx, vals = overlapping_payload(lay, k, replicas, torch.float32)
    if replicas > 1:  # chunk 0: replica 1 cancels replica 0 on their shared positions
        vals[1, : k // 2] = -vals[0, : k // 2]
    dense = torch.zeros(lay.num_chunks, 16 * 16, dtype=torch.float64, device=DEVICE)
    for r in range(replicas):
        dense.scatter_add_(1, idx[r].view(-1, k).long(), vals[r].view(-1, k).double())
    d = dct_matrix(16, DEVICE, torch.float64)
    naive = lay.from_chunks(d.T @ dense.sign().view(-1, 16, 16) @ d)
    ref = decode_mean(idx, vals, lay, k, mean=mean, coefficient_sign=True)
    torch.testing.assert_close(ref.double(), naive, rtol=1e-5, atol=1e-6)
    p0 = torch.randn(37, 45, device=DEVICE)
    a, b, c = p0.clone(), p0.clone(), p0.clone()
    decode_apply_reference(a, idx, vals, lay, k, lr=0.5, decay=0.99, sign=False, mean=mean, coefficient_sign=True)
    decode_apply_triton(b, idx, vals, lay, k, lr=0.5, decay=0.99, sign=False, mean=mean, coefficient_sign=True)
    table = ChunkTable.build([lay], [0], k, torch.device(DEVICE))
    decode_apply_triton_table(table, [c], idx, vals, lr=0.5, decay=0.99, sign=False, mean=mean,
                              coefficient_sign=True)
    update = (a - 0.99 * p0).abs().max().item()  # bf16x3 products: each factor to 16 significant bits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=2.0 ** -14 * update)
    torch.testing.assert_close(c, b, rtol=0, atol=0)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("precision", PRECISIONS_AND_DEFAULT)
def test_decode_mean_over_all_replicas(replicas, precision):
    """mean="all": each position's coefficients summed over the replicas and divided by R, whoever sent them. The
    reference equals a float64 dense decode built here; the kernel (one tensor, and a ChunkTable) equals the
    reference; both differ from the senders' mean where positions overlap."""
    torch.manual_seed(30 + replicas)
    lay, k = ChunkLayout(37, 45, 16), 6
    idx, vals = overlapping_payload(lay, k, replicas, torch.bfloat16)
    dense = torch.zeros(lay.num_chunks, 16 * 16, dtype=torch.float64, device=DEVICE)
    for r in range(replicas):
        dense.scatter_add_(1, idx[r].view(-1, k).long(), vals[r].view(-1, k).double())
    d = dct_matrix(16, DEVICE, torch.float64)
    naive = lay.from_chunks(d.T @ (dense / replicas).view(-1, 16, 16) @ d)
    ref = decode_mean(idx, vals, lay, k, mean="all")
    torch.testing.assert_close(ref.double(), naive, rtol=1e-5, atol=1e-6)
    senders = decode_mean(idx, vals, lay, k)
    assert (senders - ref).abs().max() > 0.1 * ref.abs().max()
    p0 = torch.randn(37, 45, device=DEVICE)
    a, b, c = p0.clone(), p0.clone(), p0.clone()
    decode_apply_reference(a, idx, vals, lay, k, lr=1.0, decay=0.99, sign=False, mean="all")
    decode_apply_triton(b, idx, vals, lay, k, lr=1.0, decay=0.99, sign=False, options=opts(precision=precision),
                        mean="all")
    table = ChunkTable.build([lay], [0], k, torch.device(DEVICE))
    decode_apply_triton_table(table, [c], idx, vals, lr=1.0, decay=0.99, sign=False,
                              options=opts(precision=precision), mean="all")
    update = (a - 0.99 * p0).abs().max().item()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 if precision else 2.0 ** -14 * update)
    assert torch.equal(b, c)


def test_decode_mean_is_checked():
    lay = ChunkLayout(16, 16, 16)
    idx, vals = random_payload(lay, 3, 2, torch.bfloat16)
    p = torch.zeros(16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="mean='sum'; allowed: senders, all"):
        decode_apply_triton(p, idx, vals, lay, 3, lr=1.0, decay=1.0, sign=False, mean="sum")
    with pytest.raises(ValueError, match="mean='sum'; allowed: senders, all"):
        decode_apply_reference(p, idx, vals, lay, 3, lr=1.0, decay=1.0, sign=False, mean="sum")


@pytest.mark.parametrize("rows,cols,s", [(37, 21, 16), (50, 70, 32)])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("bits", [1, 2, 8])
@pytest.mark.parametrize("select", SELECT_METHODS)
def test_encode_with_codes_matches_reference(rows, cols, s, k, bits, select):
    """value_bits in the kernel: each chunk's scale (its largest |value|, to bf16) and each value's code are the
    reference's (``quant.quantize``) wherever the two sent the same values, and the momentum loses exactly what the
    codes stand for (``quant.dequantize``), or with sign codes the values sent: residual + that = the updated
    momentum."""
    from flexdemo.quant import dequantize, keeps_error

    torch.manual_seed(rows + k + bits)
    lay = ChunkLayout(rows, cols, s)
    delta, grad = torch.randn(rows, cols, device=DEVICE), torch.randn(rows, cols, device=DEVICE)
    delta[:s, :s] = 0.0  # with the gradient's chunk below: an all-zero chunk, scale 0
    grad[:s, :s] = 0.0
    d_ref, v_ref, i_ref, c_ref, s_ref = run_encode(encode_reference, grad, delta, lay, 0.9, 0.1, k, torch.bfloat16,
                                                   bits)
    d_tri, v_tri, i_tri, c_tri, s_tri = run_encode(encode_triton, grad, delta, lay, 0.9, 0.1, k, torch.bfloat16,
                                                   bits, options=opts(select))
    assert (c_tri <= (1 << bits) - 1).all() and not s_tri.isnan().any()  # every code and scale written
    same = 0
    for c in range(lay.num_chunks):  # by index: the two order a payload differently
        a, b = i_ref[c].argsort(), i_tri[c].argsort()
        if torch.equal(i_ref[c][a], i_tri[c][b]) and torch.equal(v_ref[c][a], v_tri[c][b]):
            same += 1
            assert s_tri[c] == s_ref[c] and torch.equal(c_tri[c][b], c_ref[c][a]), c
    assert same >= lay.num_chunks // 2 and s_tri[0] == 0
    coded = dequantize(c_tri, s_tri, bits)
    applied = coded if keeps_error(bits) else v_tri.float()
    sent = torch.zeros(lay.num_chunks, s * s, device=DEVICE).scatter_(1, i_tri.long(), applied)
    m = 0.9 * delta + 0.1 * grad
    torch.testing.assert_close(d_tri + lay.from_chunks(idct2(sent.view(-1, s, s))), m, rtol=1e-5, atol=1e-5)
    assert k == 1 or not torch.equal(coded, v_tri.float())  # it did quantise (one value per chunk is its scale)
    if not keeps_error(bits):  # each code is its value's sign
        assert torch.equal(coded.sign()[v_tri != 0], v_tri.float().sign()[v_tri != 0])


@pytest.mark.parametrize("path", ["torch", "triton", "triton-table"])
@pytest.mark.parametrize("bits", [0, 2])
def test_sent_keep_leaves_that_share_of_what_was_sent_in_the_momentum(path, bits):
    """sent_keep: residual + (1 - keep) x what was sent (what its codes stand for) = the updated momentum, and the
    payload is the one sent without it."""
    from flexdemo.quant import dequantize

    torch.manual_seed(11 + bits)
    rows, cols, s, k, keep = 37, 21, 16, 5, 0.3
    lay = ChunkLayout(rows, cols, s)
    delta, grad = torch.randn(rows, cols, device=DEVICE), torch.randn(rows, cols, device=DEVICE)

    def table_launch(g, d, lay, beta, lr, k, vals, idx, **kw):
        encode_triton_table(ChunkTable.build([lay], [0], k, torch.device(DEVICE)), [g], [d], beta, lr, vals, idx,
                            **kw)

    fn = {"torch": encode_reference, "triton": encode_triton, "triton-table": table_launch}[path]
    kept = run_encode(fn, grad, delta, lay, 0.9, 0.1, k, torch.bfloat16, bits, keep=keep)
    plain = run_encode(fn, grad, delta, lay, 0.9, 0.1, k, torch.bfloat16, bits)
    for a, b in zip(kept[1:], plain[1:]):  # the same payload
        assert torch.equal(a, b)
    applied = dequantize(kept[3], kept[4], bits) if bits else kept[1].float()
    sent = torch.zeros(lay.num_chunks, s * s, device=DEVICE).scatter_(1, kept[2].long(), applied)
    lost = lay.from_chunks(idct2(sent.view(-1, s, s)))
    m = 0.9 * delta + 0.1 * grad
    torch.testing.assert_close(kept[0] + (1 - keep) * lost, m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept[0] - plain[0], keep * lost, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["torch", "triton", "triton-table"])
@pytest.mark.parametrize("bits", [0, 2])
def test_a_bf16_momentum_is_the_fp32_step_rounded_once(path, bits):
    """momentum_dtype=bf16: the same payload as the fp32 momentum holding the same values, and the residual that
    one's rounded to nearest (ties to even), bit for bit."""
    torch.manual_seed(21 + bits)
    rows, cols, s, k = 37, 21, 16, 5
    lay = ChunkLayout(rows, cols, s)
    delta = torch.randn(rows, cols, device=DEVICE).bfloat16()
    grad = torch.randn(rows, cols, device=DEVICE)

    def table_launch(g, d, lay, beta, lr, k, vals, idx, **kw):
        encode_triton_table(ChunkTable.build([lay], [0], k, torch.device(DEVICE)), [g], [d], beta, lr, vals, idx,
                            **kw)

    fn = {"torch": encode_reference, "triton": encode_triton, "triton-table": table_launch}[path]
    half = run_encode(fn, grad, delta, lay, 0.999, 0.1, k, torch.bfloat16, bits)
    full = run_encode(fn, grad, delta.float(), lay, 0.999, 0.1, k, torch.bfloat16, bits)
    assert half[0].dtype == torch.bfloat16
    for a, b in zip(half[1:], full[1:]):
        assert torch.equal(a, b)
    assert torch.equal(half[0], full[0].bfloat16())
    assert not torch.equal(half[0].float(), full[0])  # it did round


def test_a_table_launch_takes_one_momentum_dtype():
    lays = [ChunkLayout(16, 16, 16)] * 2
    table = ChunkTable.build(lays, [0, 1], 5, torch.device(DEVICE))
    grads = [torch.randn(16, 16, device=DEVICE) for _ in lays]
    deltas = [torch.zeros(16, 16, device=DEVICE), torch.zeros(16, 16, device=DEVICE, dtype=torch.bfloat16)]
    vals = torch.zeros(10, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="one momentum dtype per launch"):
        encode_triton_table(table, grads, deltas, 0.9, 0.1, vals, torch.zeros(10, dtype=torch.int32, device=DEVICE))


def test_encode_with_codes_one_launch_for_a_table_equals_one_per_tensor():
    torch.manual_seed(8)
    s, k, bits = 16, 5, 2
    shapes = [(37, 21), (16, 16)]
    lays = [ChunkLayout(r, c, s) for r, c in shapes]
    table = ChunkTable.build(lays, [0, 6], k, torch.device(DEVICE))
    grads = [torch.randn(r, c, device=DEVICE) for r, c in shapes]
    deltas = [torch.randn(r, c, device=DEVICE) for r, c in shapes]
    runs = []
    for whole in (True, False):
        d = [x.clone() for x in deltas]
        vals = torch.zeros(7 * k, dtype=torch.bfloat16, device=DEVICE)
        idx = torch.zeros(7 * k, dtype=torch.int32, device=DEVICE)
        codes, scales = torch.zeros(7 * k, dtype=torch.uint8, device=DEVICE), torch.zeros(7, device=DEVICE)
        if whole:
            encode_triton_table(table, grads, d, 0.9, 0.1, vals, idx, bits=bits, out_codes=codes, out_scales=scales)
        else:
            for t, (lay, g, m) in enumerate(zip(lays, grads, d)):
                sl = table.payload_slice(t)
                encode_triton(g, m, lay, 0.9, 0.1, k, vals[sl], idx[sl], bits=bits, out_codes=codes[sl],
                              out_scales=scales[sl.start // k : sl.stop // k])
        runs.append((*d, vals, idx, codes, scales))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_encode_codes_are_checked():
    lay = ChunkLayout(16, 16, 16)
    delta = torch.randn(16, 16, device=DEVICE)
    vals = torch.empty(3, dtype=torch.bfloat16, device=DEVICE)
    idx = torch.empty(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="bits=3; allowed: 0 .values as sent., 1, 2, 4, 8"):
        encode_triton(None, delta, lay, 0.9, 0.1, 3, vals, idx, bits=3)
    with pytest.raises(ValueError, match=r"bits=2 needs out_codes \(uint8, 3\) and out_scales \(fp32, 1\)"):
        encode_triton(None, delta, lay, 0.9, 0.1, 3, vals, idx, bits=2,
                      out_codes=torch.empty(3, dtype=torch.int32, device=DEVICE), out_scales=torch.empty(1))
