"""``flexdemo.quant``'s code and value of a code in Triton, for the kernels that quantise (encode) and dequantise
(the wire's unpacking): the same operations one by one, so the same bits as the torch twin."""

import triton
import triton.language as tl


@triton.jit
def code_of(v, scale, BITS: tl.constexpr):
    """v's nearest of the 2^BITS levels over +-scale, as fp32 (quant.quantize: no two operations fused into one
    rounding)."""
    levels = tl.full((), (1 << BITS) - 1, tl.float32)
    unit = tl.where(scale > 0, scale, 1.0)
    x = (tl.div_rn(v, tl.zeros_like(v) + unit) + 1.0) * levels * 0.5 + 0.5
    return tl.minimum(tl.maximum(tl.floor(x), 0.0), levels)


@triton.jit
def dequantised(code, scale, BITS: tl.constexpr):
    """The fp32 value a code (as fp32) stands for: (2 code - levels) / levels * scale, correctly rounded division as
    quant.dequantize's."""
    levels = tl.full((), (1 << BITS) - 1, tl.float32)
    return tl.div_rn(2.0 * code - levels, tl.zeros_like(code) + levels) * scale
