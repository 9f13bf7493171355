"""A few launches of the encode and the decode + apply kernels on one 4096 x 11008 fp32 tensor, for ncu to profile
(compile and warm-up launches first: skip them with ncu's --launch-skip).

    ncu --clock-control none -k regex:_encode_kernel -s 2 -c 1 --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python3 benchmarks/profile_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexdemo.chunks import ChunkLayout  # noqa: E402
from flexdemo.ops.decode import decode_apply_triton  # noqa: E402
from flexdemo.ops.encode import encode_triton  # noqa: E402


def main(rows: int = 4096, cols: int = 11008, s: int = 64, k: int = 32, replicas: int = 2) -> None:
    lay = ChunkLayout(rows, cols, s)
    grad = torch.randn(rows, cols, device="cuda") * 1e-3
    delta = torch.randn(rows, cols, device="cuda") * 1e-3
    param = torch.randn(rows, cols, device="cuda")
    vals = torch.empty(lay.num_chunks * k, device="cuda", dtype=torch.bfloat16)
    idx = torch.empty(lay.num_chunks * k, device="cuda", dtype=torch.int32)
    for _ in range(3):
        encode_triton(grad, delta, lay, 0.999, 1e-4, k, vals, idx)
    gi, gv = idx.repeat(replicas, 1), vals.repeat(replicas, 1)
    for _ in range(3):
        decode_apply_triton(param, gi, gv, lay, k, 1e-4, 1.0, True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
