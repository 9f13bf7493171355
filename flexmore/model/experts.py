"""Expert FFNs. One interface so the MoE layer, merging and compression never care which kind an expert is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """An FFN the MoE layer can route to. Subclasses set ``kind`` and implement forward/reset_parameters."""

    kind: str = "abstract"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def reset_parameters(self, std: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class DenseSwiGLU(Expert):
    """down(silu(gate(x)) * up(x)): the public FFN and every full-size expert."""

    kind = "full"

    def __init__(self, d_model: int, d_ffn: int, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ffn, bias=False, device=device)
        self.up_proj = nn.Linear(d_model, d_ffn, bias=False, device=device)
        self.down_proj = nn.Linear(d_ffn, d_model, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def reset_parameters(self, std: float) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)


def build_expert(kind: str, d_model: int, d_ffn: int, device=None) -> Expert:
    """The one place that maps an expert kind to its class (low-rank experts register here later)."""
    if kind == "full":
        return DenseSwiGLU(d_model, d_ffn, device=device)
    raise ValueError(f"unknown expert kind {kind!r}; allowed: 'full'")
