"""The kernel benchmark's memory floors: every op it times, fused AdamW included, has one (no `nan` ratio)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_flexdemo_kernels import memory_floors_ms  # noqa: E402


def test_each_op_moves_its_bytes_once():
    n, bw = 1000, 1e12  # 1 kB per byte-per-element: 1e-9 s = 1e-6 ms
    fp32 = memory_floors_ms(n, 4, 4, bw)
    assert fp32 == pytest.approx({"encode": 12e-6, "decode": 8e-6, "adamw": 28e-6})
    bf16 = memory_floors_ms(n, 2, 2, bw)  # bf16 gradient and parameter; the momentum stays fp32
    assert bf16 == pytest.approx({"encode": 10e-6, "decode": 4e-6, "adamw": 14e-6})


def test_gpu_work_leaves_out_the_step_annotation_that_spans_its_kernels():
    from types import SimpleNamespace as E

    from bench_optimizer_step import gpu_work_ms

    events = [E(self_device_time_total=86_000.0, is_user_annotation=True),  # Optimizer.step#...: the kernels' span
              E(self_device_time_total=60_000.0, is_user_annotation=False),
              E(self_device_time_total=25_000.0, is_user_annotation=False)]
    assert gpu_work_ms(events, steps=5) == pytest.approx(17.0)  # 85 ms of kernels over 5 steps, not 34.2
