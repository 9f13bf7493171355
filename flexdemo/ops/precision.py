"""The Triton dot precision a launch may ask for where it runs: the interpreter (CPU tests) has no bf16x3 and computes
every tl.dot in fp32, so there bf16x3 runs as ieee."""

from __future__ import annotations

import os


def runnable(precision: str) -> str:
    """``precision``, or ieee for bf16x3 under TRITON_INTERPRET=1."""
    return "ieee" if precision == "bf16x3" and os.environ.get("TRITON_INTERPRET") == "1" else precision
