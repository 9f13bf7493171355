"""The DeMo building blocks: DCT, chunking, top-k encode / decode, and the packed wire format."""

from __future__ import annotations

import pytest
import torch

from flexdemo import ChunkLayout, DeMoConfig, FlexDeMo
from flexdemo.dct import dct2, dct_matrix, idct2
from flexdemo.ops.decode_reference import decode_mean
from flexdemo.ops.encode_reference import encode_reference
from flexdemo.optimizer import plan_params
from flexdemo.wire import WireLayout, index_bits_for, pack_indices, unpack_indices


def encode(delta, lay, k, wire_dtype):
    """The reference encode with no momentum update (beta 1, no gradient): (indices, values), one row per chunk."""
    vals = torch.empty(lay.num_chunks * k, dtype=wire_dtype)
    idx = torch.empty(lay.num_chunks * k, dtype=torch.int64)
    encode_reference(None, delta, lay, 1.0, 0.0, k, vals, idx)
    return idx.view(-1, k), vals.view(-1, k)


def decode(indices, values, lay):
    k = indices[0].shape[-1]
    return decode_mean(torch.stack([i.reshape(-1) for i in indices]), torch.stack([v.reshape(-1) for v in values]), lay, k)


@pytest.mark.parametrize("n", [1, 4, 7, 64])
def test_dct_is_orthonormal_and_matches_the_cosine_formula(n):
    d = dct_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64))
    x = torch.randn(n, dtype=torch.float64)
    # DCT-II by its definition, orthonormal scaling
    ref = torch.tensor([sum(x[i] * torch.cos(torch.tensor(torch.pi * (2 * i + 1) * k / (2 * n), dtype=torch.float64))
                            for i in range(n)) * ((1 / n) ** 0.5 if k == 0 else (2 / n) ** 0.5) for k in range(n)])
    torch.testing.assert_close(d @ x, ref)


def test_dct2_round_trip():
    x = torch.randn(5, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(idct2(dct2(x)), x)
    torch.testing.assert_close((dct2(x) ** 2).sum(), (x**2).sum())  # Parseval


@pytest.mark.parametrize("rows,cols,s", [(8, 8, 4), (13, 7, 4), (3, 30, 8), (64, 64, 64), (1, 1, 4)])
def test_chunks_round_trip_and_are_real_2d_tiles(rows, cols, s):
    lay = ChunkLayout(rows, cols, s)
    x = torch.randn(rows, cols)
    c = lay.to_chunks(x)
    assert c.shape == (lay.num_chunks, s, s)
    torch.testing.assert_close(lay.from_chunks(c), x)
    # chunk (0, 1) of the grid is the tile x[:s, s:2s]
    if lay.grid[1] > 1:
        tile = x[:s, s : 2 * s]
        torch.testing.assert_close(c[1][: tile.shape[0], : tile.shape[1]], tile)


@pytest.mark.parametrize("rows,cols,s", [(8, 8, 4), (13, 7, 4), (3, 30, 8)])
def test_full_k_reproduces_the_momentum_exactly(rows, cols, s):
    lay = ChunkLayout(rows, cols, s)
    delta = torch.randn(rows, cols)
    orig = delta.clone()
    idx, vals = encode(delta, lay, s * s, torch.float32)
    assert delta.abs().max() < 1e-5  # nothing left behind
    torch.testing.assert_close(decode([idx], [vals], lay), orig, atol=1e-5, rtol=1e-5)


def test_residual_is_the_momentum_with_sent_coefficients_zeroed_and_topk_picks_the_largest():
    torch.manual_seed(0)
    lay = ChunkLayout(13, 10, 4)
    delta = torch.randn(13, 10)
    orig = delta.clone()
    idx, vals = encode(delta, lay, 3, torch.float32)
    coeffs = dct2(lay.to_chunks(orig.double())).reshape(lay.num_chunks, -1)
    checked = 0
    for c in range(lay.num_chunks):
        mags = coeffs[c].abs().sort(descending=True).values
        if mags[2] - mags[3] < 1e-5:  # a near-tie at the cut: float32 and float64 may pick differently
            continue
        top = coeffs[c].abs().topk(3).indices
        assert set(idx[c].tolist()) == set(top.tolist())
        checked += 1
    assert checked >= lay.num_chunks // 2  # edge chunks (mostly padding) have true ties
    for c in range(lay.num_chunks):  # the values sent are the coefficients at the sent positions
        torch.testing.assert_close(vals[c].double(), coeffs[c, idx[c]], atol=1e-6, rtol=1e-5)
    zeroed = coeffs.clone()
    zeroed.scatter_(1, idx, 0.0)
    expect = lay.from_chunks(idct2(zeroed.view(-1, 4, 4)))
    torch.testing.assert_close(delta.double(), expect, atol=1e-6, rtol=1e-5)


def test_bf16_wire_keeps_the_rounding_error_in_the_residual():
    lay = ChunkLayout(8, 8, 4)
    delta = torch.randn(8, 8)
    orig = delta.clone()
    idx, vals = encode(delta, lay, 16, torch.bfloat16)
    assert vals.dtype == torch.bfloat16
    # sent + residual == original: no information is dropped
    torch.testing.assert_close(decode([idx], [vals], lay) + delta, orig, atol=1e-5, rtol=1e-5)


def test_decode_averages_each_position_over_the_replicas_that_sent_it():
    lay = ChunkLayout(2, 2, 2)
    i0, v0 = torch.tensor([[0, 1]]), torch.tensor([[2.0, 4.0]])
    i1, v1 = torch.tensor([[1, 3]]), torch.tensor([[6.0, 8.0]])
    expect_coeffs = torch.tensor([2.0, 5.0, 0.0, 8.0]).view(1, 2, 2)  # position 1 averaged, 0 and 3 alone
    torch.testing.assert_close(decode([i0, i1], [v0, v1], lay), idct2(expect_coeffs)[0])


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 100])
def test_index_packing_round_trip(bits, n):
    top = 4096 if bits == 12 else 65536
    idx = torch.randint(0, top, (n,))
    if n:
        idx[0] = top - 1
    raw = pack_indices(idx, bits)
    assert raw.dtype == torch.uint8 and raw.numel() == (2 * n if bits == 16 else 3 * ((n + 1) // 2))
    back = unpack_indices(raw, n, bits)
    assert back.dtype == torch.int32 and torch.equal(back.long(), idx)


def test_wire_layout_round_trip_and_sizes():
    wl = WireLayout(num_sparse=5, num_dense=3, value_dtype=torch.bfloat16, index_bits=12)
    idx, vals = torch.tensor([0, 4095, 7, 3, 100]), torch.randn(8).bfloat16()
    buf = wl.pack(idx, vals, torch.full((wl.nbytes,), 255, dtype=torch.uint8))
    assert wl.nbytes % 8 == 0 and wl.nbytes >= 16 + 9
    i2, v2 = wl.unpack(buf)
    assert torch.equal(i2, idx) and torch.equal(v2, vals)


@pytest.mark.parametrize("bits", [12, 16])
def test_wire_unpacks_every_replica_at_once(bits):
    """The optimizer unpacks the gathered (replicas, nbytes) rows in one call: int32 indices and values that view
    the gathered bytes, each row equal to what that replica packed."""
    wl = WireLayout(num_sparse=7, num_dense=2, value_dtype=torch.bfloat16, index_bits=bits)
    top = 4096 if bits == 12 else 65536
    sent = [(torch.randint(0, top, (7,)), torch.randn(9).bfloat16()) for _ in range(3)]
    rows = torch.stack([wl.pack(i, v, torch.full((wl.nbytes,), 255, dtype=torch.uint8)) for i, v in sent])
    idx, vals = wl.unpack(rows)
    assert idx.dtype == torch.int32 and idx.shape == (3, 7) and vals.shape == (3, 9)
    assert vals.data_ptr() == rows.data_ptr()  # no copy
    for r, (i, v) in enumerate(sent):
        assert torch.equal(idx[r].long(), i) and torch.equal(vals[r], v)


def test_bf16_payload_is_3_5_bytes_per_coefficient_and_the_default_1_44():
    """DeMo's wire (bf16 values, 12-bit indices) and the default (2-bit codes with a bf16 scale per chunk, Elias-Fano
    positions: 8 + 2 + 36 bytes for 32 of 64 x 64)."""
    coeffs = 4096 * 4096 // (64 * 64) * 32
    plans, wire = plan_params([torch.Size([4096, 4096])], DeMoConfig(value_bits=0, index_coding="fixed"))
    assert wire.num_sparse == coeffs and wire.nbytes == coeffs * 3.5
    assert 4096 * 4096 * 2 / wire.nbytes >= 64
    plans, wire = plan_params([torch.Size([4096, 4096])], DeMoConfig())
    assert wire.num_sparse == coeffs and wire.nbytes == coeffs * (8 + 2 + 36) / 32


def test_1d_and_tiny_tensors_go_dense():
    plans, wire = plan_params([torch.Size([64]), torch.Size([2, 3]), torch.Size([128, 64]), torch.Size([0, 64])],
                              DeMoConfig(chunk=64, topk=32))
    assert [p.layout is None for p in plans] == [True, True, False, True]
    assert wire.num_dense == 64 + 6 and wire.num_sparse == 2 * 32


@pytest.mark.parametrize("kw, match", [
    ({"topk": 4097}, r"topk=4097 must be in \[1, chunk\*chunk=4096\]"),
    ({"topk": 0}, "topk=0"),
    ({"chunk": 0}, "chunk=0 must be >= 1"),
    ({"chunk": -3}, "chunk=-3"),
    ({"value_dtype": "int8"}, "value_dtype='int8'"),
    ({"chunk": 128, "index_bits": 12, "topk": 8}, "index_bits=12 cannot hold"),
    ({"beta": 1.0}, "beta=1.0"),
    ({"index_coding": "huffman"}, "index_coding='huffman'; allowed: fixed, elias_fano"),
    ({"index_coding": "elias_fano", "index_bits": 16}, "index_bits=16 sets the width of fixed indices"),
])
def test_bad_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        DeMoConfig(**kw)


def test_index_bits_auto():
    assert index_bits_for(64) == 12 and index_bits_for(65) == 16 and index_bits_for(64, 16) == 16


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantised_values_round_trip_within_half_a_level(bits):
    from flexdemo.quant import codes_nbytes, dequantize, pack_codes, quantize, unpack_codes

    torch.manual_seed(bits)
    vals = torch.randn(37, 5) * torch.rand(37, 1) * 10
    vals[3] = 0.0  # an all-zero chunk (a shard's padding): scale 0, every value back to 0
    codes, scales = quantize(vals, bits)
    levels = (1 << bits) - 1
    assert codes.dtype == torch.uint8 and int(codes.max()) <= levels
    assert torch.equal(scales, scales.bfloat16().float())  # the scale travels as bf16: both sides use that value
    back = dequantize(codes, scales, bits)
    step = 2 * scales / levels  # the distance between two levels
    assert ((back - vals).abs() <= step[:, None] / 2 * (1 + 1e-2) + 1e-2 * vals.abs()).all()
    assert (back[3] == 0).all()
    for n in (1, 7, 185):  # odd counts: the last byte partly filled
        raw = torch.empty(codes_nbytes(n, bits), dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes.reshape(-1)[:n], bits, raw), n, bits), codes.reshape(-1)[:n])


def test_quantised_wire_packs_codes_scales_dense_values_and_indices():
    from flexdemo.quant import dequantize, quantize
    from flexdemo.wire import WireLayout

    k, chunks, dense = 4, 6, 5
    wire = WireLayout(k * chunks, dense, torch.bfloat16, 12, value_bits=4, k=k)
    # 5 dense bf16 values, 6 bf16 scales, 24 four-bit codes, 24 twelve-bit indices, padded to 8
    assert wire.nbytes == -(-(5 * 2 + 6 * 2 + 12 + 36) // 8) * 8
    vals = torch.randn(k * chunks + dense).bfloat16()
    idx = torch.randint(0, 4096, (k * chunks,), dtype=torch.int32)
    codes, scales = quantize(vals[: k * chunks].float().view(chunks, k), 4)
    out = wire.pack(idx, vals, torch.empty(wire.nbytes, dtype=torch.uint8), codes.reshape(-1), scales)
    got_idx, got = wire.unpack(torch.stack([out, out]))
    assert torch.equal(got_idx[1], idx) and got.dtype == torch.float32
    assert torch.equal(got[0, : k * chunks], dequantize(codes, scales, 4).reshape(-1))
    assert torch.equal(got[1, k * chunks :], vals[k * chunks :].float())


def test_quantised_payload_the_momentum_keeps_what_the_codes_lose():
    """value_bits=4, one replica, sign off: after a step, residual + decoded update = lr x gradient (nothing lost
    to quantisation), and the quantised update differs from the unquantised one (it did quantise)."""
    torch.manual_seed(0)
    init, grad = torch.randn(40, 24), torch.randn(40, 24)
    applied = {}
    for bits in (0, 4):
        p = torch.nn.Parameter(init.clone())
        p.grad = grad.clone()
        opt = FlexDeMo([p], lr=0.1, base_step="direct", chunk=8, topk=5, beta=0.9, sign=False, value_dtype="fp32",
                       value_bits=bits)
        opt.step()
        applied[bits] = (init - p.detach()) / 0.1  # the decoded update (no weight decay): what was sent, lr x grad's
        residual = opt.state[p]["delta"]
        torch.testing.assert_close(residual + applied[bits], 0.1 * grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(applied[0], applied[4], atol=1e-4)
    assert FlexDeMo([torch.nn.Parameter(init.clone())], chunk=8, topk=5, value_bits=4).wire.nbytes < \
        FlexDeMo([torch.nn.Parameter(init.clone())], chunk=8, topk=5, value_bits=0).wire.nbytes


def test_bad_value_bits_is_refused():
    with pytest.raises(ValueError, match=r"value_bits=3; allowed: 0, 1, 2, 4, 8 \(0: unquantised, 1: signs\)"):
        DeMoConfig(value_bits=3)


@pytest.mark.parametrize("positions, k", [(4096, 32), (4096, 30), (4096, 1), (4096, 4096), (25, 3), (16, 5), (1, 1),
                                          (65536, 32)])
def test_elias_fano_round_trips_each_chunks_sorted_positions_in_a_fixed_size(positions, k):
    import math

    from flexdemo import elias_fano

    torch.manual_seed(k)
    chunks = 5
    idx = torch.stack([torch.randperm(positions)[:k] for _ in range(chunks)])
    idx[0, :] = positions - 1  # a chunk of repeats at the top position (a non-decreasing sequence is allowed)
    idx[1, 0] = 0
    ordered, order = elias_fano.sort_chunks(idx.reshape(-1), k)
    assert torch.equal(idx.gather(1, order), ordered) and (ordered.diff(dim=1) >= 0).all()
    nb = elias_fano.chunk_nbytes(positions, k)
    out = torch.full((chunks * nb,), 255, dtype=torch.uint8)
    elias_fano.pack(ordered, positions, out)
    back = elias_fano.unpack(torch.stack([out, out]), positions, k)  # several replicas' rows at once
    assert back.dtype == torch.int32 and back.shape == (2, chunks * k)
    assert torch.equal(back[1].view(chunks, k).long(), ordered.long())
    # the size: k (l + 1) + (u >> l) + 1 bits with l = floor(log2(u / k)), close to the fewest any code can use
    lo = math.floor(math.log2(positions / k))
    assert nb == -(-(k * (lo + 1) + ((positions - 1) >> lo) + 1) // 8)
    bound = (math.lgamma(positions + 1) - math.lgamma(k + 1) - math.lgamma(positions - k + 1)) / math.log(2)
    assert 8 * nb <= bound + 3 * k + 8


@pytest.mark.parametrize("value_bits", [0, 2])
def test_elias_fano_wire_sends_each_chunks_pairs_sorted_in_fewer_bytes(value_bits):
    from flexdemo.quant import dequantize, quantize

    k, chunks, dense = 32, 3, 5
    fixed = WireLayout(k * chunks, dense, torch.bfloat16, 12, value_bits=value_bits, k=k)
    wire = WireLayout(k * chunks, dense, torch.bfloat16, 12, value_bits=value_bits, k=k, positions=4096)
    assert fixed.indices_nbytes == chunks * 48 and wire.indices_nbytes == chunks * 36
    vals = torch.randn(k * chunks + dense).bfloat16()
    idx = torch.stack([torch.randperm(4096)[:k] for _ in range(chunks)]).view(-1).to(torch.int32)
    codes = scales = None
    if value_bits:
        codes, scales = quantize(vals[: k * chunks].float().view(chunks, k), value_bits)
        codes = codes.reshape(-1)
    rows = []
    for r in range(2):
        kept = vals.clone()
        rows.append(wire.pack(idx, kept, torch.full((wire.nbytes,), 255, dtype=torch.uint8), codes, scales))
        assert torch.equal(kept, vals)  # the caller's values are not reordered in place
    got_idx, got = wire.unpack(torch.stack(rows))
    sent = dequantize(codes.view(chunks, k), scales, value_bits).reshape(-1) if value_bits else vals[: k * chunks]
    for r in range(2):
        for c in range(chunks):  # each chunk: the same (position, value) pairs, in ascending position order
            cut = slice(c * k, (c + 1) * k)
            mine = dict(zip(idx[cut].tolist(), sent[cut].float().tolist()))
            assert got_idx[r, cut].tolist() == sorted(mine)
            assert got[r, cut].float().tolist() == [mine[i] for i in sorted(mine)]
        assert torch.equal(got[r, k * chunks :].float(), vals[k * chunks :].float())  # the dense ones as they were


def test_elias_fano_payload_with_bf16_values_is_3_125_bytes_per_coefficient():
    plans, wire = plan_params([torch.Size([4096, 4096])], DeMoConfig(value_bits=0, index_coding="elias_fano"))
    coeffs = 4096 * 4096 // (64 * 64) * 32
    assert wire.nbytes == coeffs * (2 + 36 / 32)
