"""The Triton kernels' compile-time choices as one value, passed explicitly to every launch (no module globals: a
benchmark that compares settings builds one per setting)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SELECT_METHODS = ("rank", "bisect", "maxmask")
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3")
FORWARD_PRECISIONS = PRECISIONS + ("bf16",)  # the forward DCT may also take one bf16 pass (the wire is coarser)
WIRE_PACKS = ("triton", "torch")


@dataclass(frozen=True)
class KernelOptions:
    """Defaults: the fastest settings measured on an H100 (benchmarks/HISTORY.md).

    ``select``, the encode's top-k: ``rank`` brackets the k-th largest by the k-th largest row maximum, narrows until
    at most s candidates remain and ranks those against each other; ``bisect`` searches the k-th largest magnitude's
    fp32 bits two at a time; ``maxmask`` takes k rounds of max-and-mask (the naive twin the others are tested
    against). All three pick the same set (ties: lowest index).

    ``forward_precision``, the encode's forward DCT products, decides only which coefficients are chosen and their
    values, never the momentum's consistency (it loses what was sent, as sent). None: three bf16 products (each
    factor to 16 significant bits, 128x finer than a bf16 wire's rounding; on 4096 x 11008 the ieee set in all but 5
    of 11008 chunks; 14% faster than tf32x3, ieee 2.5-5x slower) for a 16-bit wire, and tf32x3 (~2^-21) for an fp32
    wire, whose values keep 24 bits. ``bf16``: one bf16 product each (factors to 8 significant bits: near-ties of
    the selection swap, values move by ~2^-8; coarser than a bf16 wire, finer than 2-bit codes).

    ``subtract_precision``, the encode's subtraction of what was sent: bf16x3 (the momentum within 1.5e-6 of the
    ieee result, relative to its largest entry). tf32 wants both operands K-major, so the gathered basis rows would
    go to shared memory transposed, with 8-way bank conflicts; bf16 takes them as they lie: 8% faster than tf32x3.

    ``decode_precision``: bf16x3 (max error 5.5e-6 of the largest update), faster than ieee (CUDA-core fp32) and
    than tf32 (one pass, 7.9e-4, the gathered rows transposed to shared memory).

    ``wire_pack``: the default wire's per-chunk packing (sort, Elias-Fano codes, value codes) and unpacking in Triton
    kernels, or ``torch`` (their twins: the same bytes; kept to measure against).

    ``encode_warps`` / ``decode_warps``: 8 is slower. ``maxnreg``: the encode's register cap at 64 x 64 chunks (3
    blocks of 4 warps per SM instead of 2, 0-6 bytes spilled); None: uncapped; other chunk sizes are never capped.
    """

    select: str = "rank"
    forward_precision: str | None = None
    subtract_precision: str = "bf16x3"
    decode_precision: str = "bf16x3"
    encode_warps: int = 4
    decode_warps: int = 4
    maxnreg: int | None = 168
    wire_pack: str = "triton"

    def __post_init__(self) -> None:
        if self.select not in SELECT_METHODS:
            raise ValueError(f"select={self.select!r}; allowed: {', '.join(SELECT_METHODS)}")
        for name in ("forward_precision", "subtract_precision", "decode_precision"):
            value, allowed = getattr(self, name), FORWARD_PRECISIONS if name == "forward_precision" else PRECISIONS
            if value not in allowed and not (name == "forward_precision" and value is None):
                raise ValueError(f"{name}={value!r}; allowed: {', '.join(allowed)}")
        if self.wire_pack not in WIRE_PACKS:
            raise ValueError(f"wire_pack={self.wire_pack!r}; allowed: {', '.join(WIRE_PACKS)}")
        for name in ("encode_warps", "decode_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 1, 2, 4, 8, 16")

    @classmethod
    def all_in(cls, precision: str, **rest) -> "KernelOptions":
        """Every product in one precision (e.g. ieee, to compare with the fp32 torch twins)."""
        return cls(forward_precision=precision, subtract_precision=precision, decode_precision=precision, **rest)

    def forward_for(self, wire: torch.dtype) -> str:
        if self.forward_precision is not None:
            return self.forward_precision
        return "tf32x3" if wire == torch.float32 else "bf16x3"
