"""The non-FFN pieces of an OLMo2 block: RMSNorm, rotary embeddings and QK-normed attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexmore.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Normalises in fp32 and casts back, as OLMo2 does, so bf16 runs keep a stable scale."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq_len, head_dim) for the rotate-half convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, per layer (B, H_kv, T, D), for incremental decoding."""

    def __init__(self, n_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.routes: list[torch.Tensor | None] = [None] * n_layers  # route_context="prefix": router mass so far
        # route_context="sequence": the token-routed pass's own keys, and its router mass so far (over all layers)
        self.shadow: KVCache | None = None
        self.sequence_routes: torch.Tensor | None = None
        # route_context="likelihood" / "posterior": each expert's pass's keys, its log-likelihood of the real tokens
        # so far (E - 1, B), and its log-probabilities at the last token (E - 1, B, V), which score the next input
        self.passes: list[KVCache] | None = None
        self.likelihood: torch.Tensor | None = None
        self.last_logp: torch.Tensor | None = None

    @property
    def length(self) -> int:
        if self.layers[0] is None and self.passes:  # routing by likelihood: only the passes hold keys
            return self.passes[0].length
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    """Causal attention with QK-norm over the full projected width (OLMo2), then RoPE."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False, device=device)
        self.k_proj = nn.Linear(d, kv_dim, bias=False, device=device)
        self.v_proj = nn.Linear(d, kv_dim, bias=False, device=device)
        self.o_proj = nn.Linear(d, d, bias=False, device=device)
        self.q_norm = RMSNorm(d, cfg.norm_eps, device=device)
        self.k_norm = RMSNorm(kv_dim, cfg.norm_eps, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: tuple[KVCache, int] | None = None) -> torch.Tensor:
        """``mask`` (B, 1, T, T_keys) bool, True where a query may attend: for left-padded batches and cached
        decoding; None = causal. ``cache`` (cache, layer): the new keys and values are appended to it."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache[0].extend(cache[1], k, v)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
