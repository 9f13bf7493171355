"""Fused encode, in plain torch: the reference the Triton kernel is checked against, and the CPU path.

For each s x s chunk of a 2-D momentum shard: delta = beta * delta + lr * grad; 2-D DCT; the k largest |coefficients|
go to the payload (values rounded to the wire dtype, chunk-local indices); the residual is the momentum minus the
inverse DCT of what was sent (with values as codes: of what the codes stand for), so it keeps everything not sent,
rounding error included, and the unsent part never goes through a transform (no drift from a round trip every step).
"""

from __future__ import annotations

import torch

from flexdemo.chunks import ChunkLayout
from flexdemo.dct import dct2, dct_matrix, idct2
from flexdemo.quant import dequantize, keeps_error, quantize


def topk_chunks(coeffs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_chunks, s*s) -> (indices (num_chunks, k) int64, values): the k largest |c| of each chunk.

    Exact ties are broken however torch.topk breaks them (deterministically for one input); the Triton kernel takes
    the lowest index, and the two are compared only where magnitudes are distinct.
    """
    flat = coeffs.reshape(coeffs.shape[0], -1)
    idx = flat.abs().topk(k, dim=1, sorted=False).indices
    return idx, torch.gather(flat, 1, idx)


# the forward DCT's one-pass products (KernelOptions.forward_precision): each factor's significant bits
ONE_PASS_BITS = {"tf32": 11, "bf16": 8}


def round_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 -> fp32 with ``bits`` significant bits, to nearest (ties to even): as a tensor core reads tf32 or bf16
    factors (finite inputs)."""
    drop = 24 - bits
    b = x.view(torch.int32)
    return ((b + (1 << (drop - 1)) - 1 + ((b >> drop) & 1)) & -(1 << drop)).view(torch.float32)


def forward_dct(chunks: torch.Tensor, precision: str | None = None) -> torch.Tensor:
    """dct2 in fp32, or (``precision`` tf32 / bf16) as one tensor-core pass per product computes it: each factor
    rounded to nearest, exact products summed in fp32, C = D (m D^T) with m D^T rounded in between, as the Triton
    encode's rank selection builds C^T = (D m^T) D^T (at k <= s / 2; above, it rounds D m instead). The summation
    order aside, its one-pass forward (whose tf32 factors the hardware may truncate instead of rounding)."""
    bits = ONE_PASS_BITS.get(precision)
    if bits is None:
        return dct2(chunks)
    d = round_to_bits(dct_matrix(chunks.shape[-1], chunks.device, torch.float32), bits)
    return d @ round_to_bits(round_to_bits(chunks, bits) @ d.T, bits)


def encode_reference(grad: torch.Tensor | None, delta: torch.Tensor, layout: ChunkLayout, beta: float, lr: float,
                     k: int, out_vals: torch.Tensor, out_idx: torch.Tensor, bits: int = 0,
                     out_codes: torch.Tensor | None = None, out_scales: torch.Tensor | None = None,
                     keep: float = 0.0, forward: str | None = None) -> None:
    """Update ``delta`` (rows, cols) fp32 in place to the residual; write (num_chunks * k) values and indices.
    ``bits`` > 0: also each chunk's values as codes and a scale (``flexdemo.quant``; ``out_codes`` uint8,
    ``out_scales`` fp32), and the residual keeps what the codes lose (it loses the dequantised values; 1-bit sign
    codes: the sent values whole). ``keep``: the residual loses only (1 - keep) times what was sent. ``forward``:
    the forward DCT's products (``forward_dct``; the residual still loses exactly what was sent). A bf16 ``delta``
    (momentum_dtype=bf16): the step computed in fp32, the residual rounded to nearest once, as the kernel stores it."""
    if delta.dtype != torch.float32:
        work = delta.float()
        encode_reference(grad, work, layout, beta, lr, k, out_vals, out_idx, bits, out_codes, out_scales, keep, forward)
        delta.copy_(work)
        return
    delta.mul_(beta)
    if grad is not None:
        delta.add_(grad.float(), alpha=lr)
    coeffs = forward_dct(layout.to_chunks(delta), forward).reshape(layout.num_chunks, -1)
    idx, vals = topk_chunks(coeffs, k)
    sent = vals.to(out_vals.dtype)
    applied = sent.float()
    if bits:
        codes, scales = quantize(applied, bits)
        if keeps_error(bits):
            applied = dequantize(codes, scales, bits)
        out_codes.copy_(codes.reshape(-1))
        out_scales.copy_(scales)
    if keep:
        applied = applied * (1.0 - keep)
    sparse = torch.zeros_like(coeffs).scatter_(1, idx, applied)
    delta.sub_(layout.from_chunks(idct2(sparse.view(-1, layout.s, layout.s))))
    out_vals.copy_(sent.reshape(-1))
    out_idx.copy_(idx.reshape(-1))
