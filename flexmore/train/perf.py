"""Throughput accounting: tokens/s and model FLOPs utilisation against the device's dense bf16 peak."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by substring of the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "H800": 989.5, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "A6000": 154.8, "4090": 165.2}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """FLOP/s to divide by for MFU; None where unknown (CPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None
