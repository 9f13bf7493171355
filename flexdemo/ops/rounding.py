"""fp32 -> bf16 rounding done by hand (round to nearest, ties to even), so the kernels round like torch everywhere.

Triton's interpreter truncates fp32 -> bf16 (numpy has no bf16) while GPUs round to nearest even; a bf16 wire or a
bf16 parameter would then differ by an ulp between the CPU tests and the GPU. Rounding the fp32 bits first makes the
final cast exact on both; ``cast_like`` does it only in the interpreter, where it is needed (a GPU's own conversion
already rounds to nearest even). Finite inputs only (momenta and parameters are).
"""

import os

import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read once: it must be set before triton is imported
INTERPRETING = tl.constexpr(_INTERPRETING)


@triton.jit
def round_to_bf16(x):
    """fp32 -> fp32 holding the nearest bf16 value (ties to even)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_like(x, ptr):
    """fp32 x cast to ptr's element type, rounding to nearest even for bf16 (by hand in the interpreter)."""
    if INTERPRETING:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = round_to_bf16(x)
    return x.to(ptr.dtype.element_ty)
