"""Fewer bits per sent coefficient: each chunk's k values as b-bit codes and one scale (SparseLoCo's idea).

A chunk's scale is the largest |value| it sends, rounded to bf16 (2 bytes on the wire); code c in 0..2^b - 1 stands for
(2c - (2^b - 1)) / (2^b - 1) x scale: 2^b levels spread evenly over [-scale, scale], none at zero (a top-k value is
never small next to its chunk's largest). Encoder and decoder compute the dequantised value with the same fp32
operations from the same code and bf16 scale, so the momentum can lose exactly what the replicas apply: the encode
(its kernel, and its torch twin) subtracts the dequantised values, so the quantisation error stays in the momentum
(error feedback).
"""

from __future__ import annotations

import torch

# 0: values in the wire dtype, unquantised; 2, 4, 8: codes whose error the momentum keeps (it loses what they stand
# for); 1 (SIGN_BITS): each value's sign at its chunk's scale (the two levels +-scale), the momentum losing the whole
# value, as unquantised, so no magnitude is fed back (a 1-bit code's error would be most of each value). With the
# coefficient sign at one replica the sign codes' update is the unquantised one. A chunk of zeros has scale 0 and
# sends zeros; a 0 among nonzero values would go as +scale (top-k values are zero only where a tile's DCT has fewer
# than k nonzero coefficients).
SIGN_BITS = 1
VALUE_BITS = (0, SIGN_BITS, 2, 4, 8)


def keeps_error(bits: int) -> bool:
    """Whether the momentum keeps what ``bits``-bit codes lose (it loses the dequantised values), or (0 and signs)
    loses each sent value whole."""
    return bits > SIGN_BITS


def quantize(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunks, k) -> codes (chunks, k) uint8 and scales (chunks,) fp32 holding bf16 values."""
    levels = (1 << bits) - 1
    v = values.float()
    scale = v.abs().amax(dim=1).bfloat16().float()
    unit = v / torch.where(scale > 0, scale, 1.0)[:, None]
    # nearest level, halves up; spelled so that no two operations fuse into one rounding (a*b + c), which the
    # Triton encode (flexdemo.ops.encode) would otherwise be free to do: both get the same codes
    codes = torch.floor((unit + 1) * levels * 0.5 + 0.5).clamp_(0, levels).to(torch.uint8)
    return codes, scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., chunks, k), scales (..., chunks) -> fp32 values (..., chunks, k)."""
    levels = (1 << bits) - 1
    # divided by a tensor: a Python number as divisor makes CUDA multiply by its rounded reciprocal (1 ulp off the
    # Triton kernels' correctly rounded division)
    return (2 * codes.float() - levels) / codes.new_full((), levels, dtype=torch.float32) * scales[..., None]


def codes_nbytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 codes < 2^bits -> ``out`` (codes_nbytes(n, bits),) uint8, 8 / bits codes per byte, first in the low
    bits."""
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    out.copy_((groups << shifts).sum(dim=1).to(torch.uint8))
    return out


def unpack_codes(raw: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 (..., codes_nbytes(n, bits)) -> uint8 codes (..., n)."""
    per = 8 // bits
    shifts = torch.arange(per, device=raw.device, dtype=torch.int32) * bits
    codes = (raw.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*raw.shape[:-1], -1)[..., :n].to(torch.uint8)
