"""The orthonormal DCT-II basis. A chunk X (s x s) transforms as D X D^T and back as D^T C D, since D D^T = I."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def dct_matrix(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D with D[k, i] = sqrt(2/n) * c_k * cos(pi (2i + 1) k / 2n), c_0 = 1/sqrt(2); cached per (n, device, dtype)."""
    key = (n, str(device), dtype)
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = _dct_matrix_cpu(n).to(device=device, dtype=dtype)
    return _DEVICE_CACHE[key]


def dct_matrix_halves(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2, n, n) bf16: D rounded to bf16 (hi) and the rest of D rounded to bf16 (lo), hi + lo within 2^-17 of D: the
    kernels' bf16x3 products read the basis already split instead of splitting it on every launch; cached."""
    key = (n, str(device), "halves")
    if key not in _DEVICE_CACHE:
        d = dct_matrix(n, device, torch.float32)
        hi = d.to(torch.bfloat16)
        _DEVICE_CACHE[key] = torch.stack([hi, (d - hi.float()).to(torch.bfloat16)]).contiguous()
    return _DEVICE_CACHE[key]


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D DCT of each (s, s) chunk in a (..., s, s) batch."""
    d = dct_matrix(x.shape[-1], x.device, x.dtype)
    return d @ x @ d.T


def idct2(c: torch.Tensor) -> torch.Tensor:
    d = dct_matrix(c.shape[-1], c.device, c.dtype)
    return d.T @ c @ d
