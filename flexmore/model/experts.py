"""Expert FFNs. One interface so the MoE layer, merging and compression never care which kind an expert is.

- ``DenseSwiGLU`` ("full"): the public FFN and every full-size expert.
- ``LowRankSwiGLU`` ("lowrank"): the public FFN's weights plus a rank-r delta B A per projection, inside the SwiGLU:
  down((W_g + B_g A_g) x ...). It stores only A and B and reads W_public from the public expert it is built on.
  A projection whose rank reaches the break-even d f / (d + f) costs less as a dense matrix: it is stored as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Ranks:
    """The ranks (gate, up, down) of a low-rank expert, validated where they enter; ``Ranks.of`` takes one rank for
    all three or three, as an int, a list or text ("16", "8,16,8")."""

    gate: int
    up: int
    down: int

    def __post_init__(self) -> None:
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.as_list()):
            raise ValueError(f"ranks={self.as_list()}: need whole ranks >= 1 (gate, up, down)")

    @classmethod
    def of(cls, value) -> Ranks:
        if isinstance(value, Ranks):
            return value
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.split(",")]
            except ValueError:
                raise ValueError(f"ranks {value!r}: one rank, or three as gate,up,down") from None
        if isinstance(value, int):
            value = [value]
        value = list(value)
        if len(value) not in (1, 3):
            raise ValueError(f"ranks={value}: one rank, or three (gate, up, down)")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in value):
            raise ValueError(f"ranks={value}: need whole ranks >= 1 (gate, up, down)")
        return cls(*(value * 3 if len(value) == 1 else value))

    def as_list(self) -> list[int]:
        return [self.gate, self.up, self.down]


class Expert(nn.Module):
    """An FFN the MoE layer can route to. Subclasses set ``kind`` and implement forward/reset_parameters."""

    kind: str = "abstract"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def reset_parameters(self, std: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class DenseSwiGLU(Expert):
    """down(silu(gate(x)) * up(x))."""

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


def break_even_rank(out_features: int, in_features: int) -> float:
    """Above this rank, factors (r (in + out) numbers) cost more than the dense matrix (in x out)."""
    return out_features * in_features / (out_features + in_features)


def stored_dense(rank: int, out_features: int, in_features: int) -> bool:
    return rank >= break_even_rank(out_features, in_features)


class LowRankDelta(nn.Module):
    """y = W_public x + B (A x). B starts at zero, so a fresh expert equals the public FFN exactly."""

    def __init__(self, public: nn.Linear, rank: int, device=None):
        super().__init__()
        out_f, in_f = public.weight.shape
        object.__setattr__(self, "public", public)  # shared and frozen: not a submodule, not in this state dict
        self.A = nn.Parameter(torch.empty(rank, in_f, device=device))
        self.B = nn.Parameter(torch.zeros(out_f, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.public(x) + F.linear(F.linear(x, self.A), self.B)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)


class LowRankSwiGLU(Expert):
    """The public SwiGLU with a per-projection delta: rank r factors, or a dense matrix at or past break-even."""

    kind = "lowrank"

    def __init__(self, public: DenseSwiGLU, ranks: Ranks | list[int], device=None):
        super().__init__()
        ranks = Ranks.of(ranks).as_list()
        self.ranks = ranks
        for name, r in zip(PROJECTIONS, ranks):
            pub: nn.Linear = getattr(public, name)
            out_f, in_f = pub.weight.shape
            if stored_dense(r, out_f, in_f):
                setattr(self, name, nn.Linear(in_f, out_f, bias=False, device=device))
            else:
                setattr(self, name, LowRankDelta(pub, r, device=device))
        object.__setattr__(self, "public", public)

    def dense_projections(self) -> list[str]:
        return [n for n in PROJECTIONS if isinstance(getattr(self, n), nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def reset_parameters(self, std: float) -> None:
        """A fresh low-rank expert is the public FFN: B = 0 (and dense projections copy the public weight)."""
        for name in PROJECTIONS:
            mod = getattr(self, name)
            if isinstance(mod, LowRankDelta):
                mod.reset_parameters()
            else:
                with torch.no_grad():
                    mod.weight.copy_(getattr(self.public, name).weight)

    @torch.no_grad()
    def delta(self, name: str) -> torch.Tensor:
        """W_expert - W_public of one projection."""
        mod = getattr(self, name)
        if isinstance(mod, LowRankDelta):
            return mod.B @ mod.A
        return mod.weight - getattr(self.public, name).weight


def build_expert(kind: str, d_model: int, d_ffn: int, device=None, public: DenseSwiGLU | None = None,
                 ranks: list[int] | None = None) -> Expert:
    """The one place that maps an expert kind to its class."""
    if kind == "full":
        return DenseSwiGLU(d_model, d_ffn, device=device)
    if kind == "lowrank":
        if public is None:
            raise ValueError("a lowrank expert needs the public expert it adds its delta to")
        return LowRankSwiGLU(public, ranks or [], device=device)
    raise ValueError(f"unknown expert kind {kind!r}; allowed: 'full', 'lowrank'")
