"""The Triton dot precisions the kernels use, and the hand-split bf16x3 product of gathered basis rows (decode).

The interpreter (CPU tests) has no built-in bf16x3 and computes every tl.dot in fp32, so a launch there asks for ieee
instead (``runnable``). The basis-row product splits its operands by hand and runs everywhere, the same bf16 factors
on CPU and GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flexdemo.ops.rounding import INTERPRETING, round_to_bf16


def runnable(precision: str) -> str:
    """``precision``, or ieee for bf16x3 under TRITON_INTERPRET=1."""
    return "ieee" if precision == "bf16x3" and INTERPRETING.value else precision


@triton.jit
def dot_basis_rows_bf16x3(acc, rows, b, halves_ptr, si, S: tl.constexpr):
    """acc + D[rows, :]^T @ b as three bf16 products (D_hi^T b_lo + D_lo^T b_hi + D_hi^T b_hi: each factor to 16
    significant bits, like Triton's bf16x3). D's rows come split from ``halves_ptr`` (``dct_matrix_halves``), so only
    b (KB, S) fp32 is split here, rounding to nearest even on GPU and in the interpreter alike; every operand goes to
    the tensor cores from shared memory as it was loaded (D^T, not b^T: b^T would be a register operand that first
    goes through shared memory to change layout). The interpreter, whose bf16 tl.dot is wrong, multiplies the same
    bf16 factors in fp32, which is exact."""
    d_hi = tl.trans(tl.load(halves_ptr + rows[:, None] * S + si[None, :]))
    d_lo = tl.trans(tl.load(halves_ptr + S * S + rows[:, None] * S + si[None, :]))
    if INTERPRETING:
        b_hi = round_to_bf16(b)
        b_lo = round_to_bf16(b - b_hi)
        acc = tl.dot(d_hi.to(tl.float32), b_lo, acc, input_precision="ieee")
        acc = tl.dot(d_lo.to(tl.float32), b_hi, acc, input_precision="ieee")
        acc = tl.dot(d_hi.to(tl.float32), b_hi, acc, input_precision="ieee")
    else:
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(d_hi, b_lo, acc)
        acc = tl.dot(d_lo, b_hi, acc)
        acc = tl.dot(d_hi, b_hi, acc)
    return acc
