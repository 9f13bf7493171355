"""GPU timing shared by the benchmarks: median milliseconds (triton's do_bench) and the copy bandwidth that defines
the memory floors."""

from __future__ import annotations

import torch


def ms(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of ``fn`` over ``rep`` ms of calls after ``warmup`` ms (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (ms(lambda: y.copy_(x)) / 1e3)
