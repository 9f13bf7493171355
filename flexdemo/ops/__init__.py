"""Encode, decode + apply, decode + the chunks' orthogonal step + apply, and the wire's packing: Triton kernels with a
torch twin beside each, and the dispatch between them.

``kernels``: ``torch`` (the references, any device), ``triton`` (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), ``auto`` (triton on CUDA where the chunk size suits it, torch otherwise).
"""

from __future__ import annotations

import os

import torch

from flexdemo.ops.chunk_table import ChunkTable
from flexdemo.ops.options import KernelOptions
from flexdemo.wire import WireLayout

KERNELS = ("auto", "torch", "triton")
TRITON_CHUNKS = (16, 32, 64, 128)  # tl.arange wants powers of two; tl.dot wants >= 16


def triton_unavailable(device: torch.device, chunk: int) -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    if chunk not in TRITON_CHUNKS:
        return f"chunk={chunk} is not one of {TRITON_CHUNKS}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)"
    return None


def resolve_kernels(requested: str, device: torch.device, chunk: int) -> str:
    if requested not in KERNELS:
        raise ValueError(f"kernels={requested!r}; allowed: {', '.join(KERNELS)}")
    why = triton_unavailable(device, chunk)
    if requested == "triton" and why:
        raise ValueError(f"kernels=triton cannot run: {why}; use kernels=torch or auto")
    if requested == "auto":
        return "triton" if why is None and device.type == "cuda" else "torch"
    return requested


def encode_table(kernels: str, table: ChunkTable, grads: list, deltas: list, beta: float, lr,
                 out_vals: torch.Tensor, out_idx: torch.Tensor, options: KernelOptions = KernelOptions(),
                 addresses: torch.Tensor | None = None, bits: int = 0, out_codes: torch.Tensor | None = None,
                 out_scales: torch.Tensor | None = None, keep: float = 0.0) -> None:
    """Encode every tensor of ``table``: one launch (triton) or the reference per tensor (torch: fp32 products, or
    the one-pass forward DCT that ``options.forward_precision`` names, rounded alike).
    ``addresses``: the triton launch reads the tensors through these rows instead of ``table.addresses``'s.
    ``bits``: the values also as codes (``out_codes``, one per value) and scales (``out_scales``, one per chunk), the
    momenta losing what the codes stand for; ``keep``: (1 - keep) times that."""
    if kernels == "triton":
        from flexdemo.ops.encode import encode_triton_table

        return encode_triton_table(table, grads, deltas, beta, lr, out_vals, out_idx, options, addresses=addresses,
                                   bits=bits, out_codes=out_codes, out_scales=out_scales, keep=keep)
    from flexdemo.ops.encode_reference import encode_reference

    k = table.k
    for t, (lay, g, m) in enumerate(zip(table.layouts, grads, deltas)):
        sl = table.payload_slice(t)
        codes = scales = None
        if bits:
            codes, scales = out_codes[sl], out_scales[sl.start // k : sl.stop // k]
        encode_reference(g, m, lay, beta, lr, k, out_vals[sl], out_idx[sl], bits, codes, scales, keep,
                         options.forward_precision)


def decode_apply_table(kernels: str, table: ChunkTable, params: list, indices: torch.Tensor, values: torch.Tensor,
                       lr: float, decay: float, sign: bool, options: KernelOptions = KernelOptions(),
                       mean: str = "senders", coefficient_sign: bool = False) -> None:
    """Decode + apply every tensor of ``table``: one launch (triton) or the reference per tensor (torch, always
    fp32). ``mean``: per position over the replicas that sent it, or over all (``decode_reference``);
    ``coefficient_sign``: the mean coefficients' signs decoded instead."""
    if kernels == "triton":
        from flexdemo.ops.decode import decode_apply_triton_table

        return decode_apply_triton_table(table, params, indices, values, lr, decay, sign, options, mean,
                                         coefficient_sign)
    from flexdemo.ops.decode_reference import decode_apply_reference

    for t, (lay, p) in enumerate(zip(table.layouts, params)):
        sl = table.payload_slice(t)
        decode_apply_reference(p, indices[:, sl], values[:, sl], lay, table.k, lr, decay, sign, mean,
                               coefficient_sign)


def decode_orthogonal_table(kernels: str, table: ChunkTable, params: list, indices: torch.Tensor,
                            values: torch.Tensor, lr: float, decay: float, precision: str = "fp32",
                            mean: str = "senders") -> None:
    """base_step=orthogonal at orthogonal_scope=chunk: decode, each chunk's orthogonal step and the apply for every
    tensor of ``table``, one launch (triton) or the twin per tensor (torch)."""
    if kernels == "triton":
        from flexdemo.ops.decode_orthogonal import decode_orthogonal_apply_triton_table

        return decode_orthogonal_apply_triton_table(table, params, indices, values, lr, decay, precision, mean)
    from flexdemo.ops.decode_orthogonal_reference import decode_orthogonal_apply_reference

    for t, (lay, p) in enumerate(zip(table.layouts, params)):
        sl = table.payload_slice(t)
        decode_orthogonal_apply_reference(p, indices[:, sl], values[:, sl], lay, table.k, lr, decay, precision, mean)


def pack_wire(kernels: str, wire: WireLayout, sparse_idx: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
              codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
              options: KernelOptions = KernelOptions()) -> torch.Tensor:
    """``wire.pack``: its per-chunk work in one launch (triton, ``options.wire_pack``) or in torch; the same bytes."""
    if kernels == "triton" and options.wire_pack == "triton":
        from flexdemo.ops.wire_pack import pack_triton

        return pack_triton(wire, sparse_idx, values, out, codes, scales)
    return wire.pack(sparse_idx, values, out, codes, scales)


def unpack_wire(kernels: str, wire: WireLayout, rows: torch.Tensor,
                options: KernelOptions = KernelOptions()) -> tuple[torch.Tensor, torch.Tensor]:
    """``wire.unpack``, its per-chunk work in one launch over every replica (triton) or in torch; the same numbers."""
    if kernels == "triton" and options.wire_pack == "triton":
        from flexdemo.ops.wire_pack import unpack_triton

        return unpack_triton(wire, rows)
    return wire.unpack(rows)
