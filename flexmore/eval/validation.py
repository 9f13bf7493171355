"""Validation loss per domain, identical on every rank (the training loop's evals and flexmore-eval use it)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def autocast_ctx(mode: str, device: torch.device):
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)  # SUM: gloo has no AVG
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def evaluate(model, val_sets: dict, device: torch.device, autocast: str) -> dict[str, float]:
    """Every rank runs every batch (FSDP's collectives need all ranks in step), so all ranks agree."""
    model.eval()
    out = {}
    for name, batches in val_sets.items():
        total, count = 0.0, 0
        for x, y in batches:
            with autocast_ctx(autocast, device):
                res = model(x.to(device), y.to(device))
            total += mean_over_ranks(res.ce_loss.detach()).item() * y.numel()
            count += y.numel()
        out[name] = total / count
    model.train()
    return out
