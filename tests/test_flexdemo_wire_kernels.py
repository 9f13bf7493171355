"""The wire's packing kernels against their torch twin (``WireLayout.pack`` / ``unpack``): the same bytes, the same
positions and values, on small odd shapes (the interpreter on CPU, the GPU through the device tool)."""

from __future__ import annotations

import pytest
import torch

from flexdemo import DeMoConfig, FlexDeMo
from flexdemo.quant import quantize
from flexdemo.wire import WireLayout

pytest.importorskip("triton")

from flexdemo.ops import pack_wire, unpack_wire  # noqa: E402
from flexdemo.ops.options import KernelOptions  # noqa: E402
from flexdemo.ops.wire_pack import kernels_fit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (positions, k, value_bits, wire dtype): the default (4096, 32, 2 bits), each code width, values unquantised, a
# k that is not a power of two, low parts of 0 bits (u / k < 2) and of 11 (u = 65536, chunk 256), a code that fills
# a byte only per chunk (k 4 x 2 bits), one position a chunk
CASES = [(4096, 32, 2, torch.bfloat16), (4096, 32, 1, torch.bfloat16), (4096, 32, 4, torch.float32),
         (4096, 32, 8, torch.bfloat16), (4096, 32, 0, torch.bfloat16), (4096, 24, 0, torch.float32),
         (4096, 40, 2, torch.bfloat16), (25, 16, 0, torch.float16), (16, 12, 2, torch.bfloat16),
         (65536, 32, 2, torch.bfloat16), (256, 4, 2, torch.bfloat16), (1024, 1, 8, torch.float32)]


def payload(positions, k, bits, dtype, chunks, dense, seed):
    """A wire and one replica's (indices, values, codes, scales) as the encode leaves them: each chunk's k distinct
    positions in no order, values (bits: codes and scales too) of random signs and sizes."""
    g = torch.Generator().manual_seed(seed)
    wire = WireLayout(chunks * k, dense, dtype, 12, value_bits=bits, k=k, positions=positions)
    idx = torch.stack([torch.randperm(positions, generator=g)[:k] for _ in range(chunks)]).view(-1).to(torch.int32)
    vals = (torch.randn(chunks * k + dense, generator=g) * torch.rand(chunks * k + dense, generator=g)).to(dtype)
    codes = scales = None
    if bits:
        codes, scales = quantize(vals[: chunks * k].float().view(chunks, k), bits)
        codes = codes.reshape(-1)
        scales[0] = 0.0  # a chunk of zeros sends scale 0
        codes = codes.to(DEVICE)
        scales = scales.to(DEVICE)
    return wire, idx.to(DEVICE), vals.to(DEVICE), codes, scales


@pytest.mark.parametrize("positions, k, bits, dtype", CASES)
def test_pack_and_unpack_kernels_give_the_torch_bytes_and_numbers(positions, k, bits, dtype):
    chunks, dense = 7, 5
    rows = {"triton": [], "torch": []}
    for seed in range(3):  # three replicas
        wire, idx, vals, codes, scales = payload(positions, k, bits, dtype, chunks, dense, seed)
        assert kernels_fit(wire)
        for way in rows:
            kept = vals.clone()
            out = torch.full((wire.nbytes,), 255, dtype=torch.uint8, device=DEVICE)  # stale bytes: all overwritten
            rows[way].append(pack_wire("triton", wire, idx, kept, out, codes, scales, KernelOptions(wire_pack=way)))
            assert torch.equal(kept, vals)  # the caller's values are not reordered in place
    got, want = torch.stack(rows["triton"]), torch.stack(rows["torch"])
    assert torch.equal(got, want), (got != want).nonzero()[:8].tolist()
    # unpacked: every replica's rows at once, and one row alone, strided (the tensor-scale path slices the rows)
    wide = torch.cat([want, torch.zeros(3, 8, dtype=torch.uint8, device=DEVICE)], dim=1)[:, : want.shape[1]]
    for rows_in in (want, wide, want[1]):
        gi, gv = unpack_wire("triton", wire, rows_in)
        wi, wv = unpack_wire("triton", wire, rows_in, KernelOptions(wire_pack="torch"))
        assert gi.dtype == wi.dtype == torch.int32 and gi.shape == wi.shape and torch.equal(gi, wi)
        assert gv.dtype == wv.dtype and gv.shape == wv.shape and torch.equal(gv, wv)


def test_pack_kernel_keeps_repeated_positions_in_slot_order():
    """Repeated positions (a non-decreasing sequence is a valid code) keep their slots' order, as the stable torch
    sort does, so their values go in the same order."""
    wire, idx, vals, _, _ = payload(4096, 32, 0, torch.float32, 3, 0, 0)
    idx = idx.clone()
    idx[5:12] = 7
    idx[32:64] = 4095
    outs = [pack_wire("triton", wire, idx, vals, torch.empty(wire.nbytes, dtype=torch.uint8, device=DEVICE),
                      options=KernelOptions(wire_pack=w)) for w in ("triton", "torch")]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("positions, k, bits", [(4096, 30, 1), (4096, 2048, 2)])
def test_wires_the_kernels_do_not_take_go_through_torch(positions, k, bits):
    """k * value_bits not a multiple of 8 (a chunk's codes end mid-byte), or a k whose bytes-by-positions tile would
    not fit a program: the whole payload packs and unpacks in torch."""
    wire, idx, vals, codes, scales = payload(positions, k, bits, torch.bfloat16, 3, 3, 0)
    assert not kernels_fit(wire)
    out = [pack_wire("triton", wire, idx, vals, torch.empty(wire.nbytes, dtype=torch.uint8, device=DEVICE), codes,
                     scales, KernelOptions(wire_pack=w)) for w in ("triton", "torch")]
    assert torch.equal(out[0], out[1])
    back = [unpack_wire("triton", wire, out[0], KernelOptions(wire_pack=w)) for w in ("triton", "torch")]
    assert all(torch.equal(a, b) for a, b in zip(*back))


def test_bad_wire_pack_is_refused():
    with pytest.raises(ValueError, match=r"wire_pack='cuda'; allowed: triton, torch"):
        KernelOptions(wire_pack="cuda")


def test_optimizer_steps_the_same_with_either_packing():
    """Two simulated replicas over a few steps with the default wire: the kernels' packing and the torch one leave
    the same parameters (the same bytes go out, the same numbers come back)."""
    torch.manual_seed(0)
    shapes = [(70, 50), (64, 64), (33,)]
    inits = [torch.randn(s, device=DEVICE) for s in shapes]
    grads = [[torch.randn(s, device=DEVICE) for s in shapes] for _ in range(2 * 3)]
    result = {}
    for way in ("triton", "torch"):
        reps = [[torch.nn.Parameter(x.clone()) for x in inits] for _ in range(2)]
        opts = [FlexDeMo(ps, lr=1e-2, config=DeMoConfig(chunk=16, topk=8, kernels="triton"),
                         kernel_options=KernelOptions.all_in("ieee", wire_pack=way)) for ps in reps]
        assert opts[0].wire.positions == 256 and opts[0].wire.value_bits == 2
        for step in range(3):
            for r, (ps, opt) in enumerate(zip(reps, opts)):
                for p, g in zip(ps, grads[2 * step + r]):
                    p.grad = g.clone()
            gathered = torch.stack([opt.encode() for opt in opts])
            for opt in opts:
                opt.decode_apply(gathered)
        assert all(torch.equal(a, b) for a, b in zip(reps[0], reps[1]))
        result[way] = [p.detach().clone() for p in reps[0]]
    assert all(torch.equal(a, b) for a, b in zip(result["triton"], result["torch"]))
