"""FlexOlmo's MoE FFN: expert 0 is the public FFN, a bias-free linear router, softmax over all experts then top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexmore.model.config import ModelConfig
from flexmore.model.experts import Expert, build_expert


class Router(nn.Module):
    """A bias-free linear router with one row per expert, kept as two tensors so the public row can stay frozen
    while a contributor trains its own row (``requires_grad`` is per tensor)."""

    def __init__(self, d_model: int, num_experts: int, device=None):
        super().__init__()
        self.public = nn.Parameter(torch.empty(1, d_model, device=device))
        self.experts = nn.Parameter(torch.empty(num_experts - 1, d_model, device=device))

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.public, self.experts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MoEFFN(nn.Module):
    """Routes each token to top-k experts and sums their outputs weighted by the (unrenormalised) router probability.

    With one expert there is no router: the layer is the dense FFN, so a dense model is the E = 1 case and upcycling
    keeps expert 0's parameter names.
    """

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.top_k, cfg.norm_topk_prob
        experts = [build_expert("full", cfg.d_model, cfg.d_ffn, device)]
        for e in range(1, cfg.num_experts):
            experts.append(build_expert(cfg.expert_kind(e), cfg.d_model, cfg.d_ffn, device, public=experts[0],
                                        ranks=cfg.expert_rank(e)))
        self.experts = nn.ModuleList(experts)
        self.router = Router(cfg.d_model, cfg.num_experts, device=device) if cfg.is_moe else None
        # b <= 0 for experts 1..E-1 only: the public expert's logit is never biased.
        self.expert_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts - 1, device=device)) if cfg.is_moe and cfg.expert_bias else None
        )

    def reset_parameters(self, std: float) -> None:
        for e in self.experts:
            e.reset_parameters(std)
        if self.router is not None:
            for w in (self.router.public, self.router.experts):
                nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
        if self.expert_bias is not None:
            nn.init.zeros_(self.expert_bias)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, E) in at least fp32, with min(b, 0) added to the non-public experts."""
        logits = self.router(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.expert_bias is not None:
            zero = torch.zeros(1, device=logits.device, dtype=logits.dtype)
            logits = logits + torch.cat([zero, self.expert_bias.float().clamp(max=0.0)])
        return logits

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k), expert ids (N, k)), sorted by probability, without renormalisation unless configured."""
        probs = torch.softmax(logits, dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.router is None:
            return self.experts[0](x), {}
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router_logits(x)
        weights, ids = self.routing(logits)
        N, k = ids.shape
        if k == self.num_experts:  # every expert sees every token (FlexOlmo's 2-of-2): no gather, no graph breaks
            w = weights.new_zeros(N, k).scatter_(1, ids, weights).to(x.dtype)
            y = sum(expert(x) * w[:, e, None] for e, expert in enumerate(self.experts))
            return y.view(shape), self.aux_losses(logits, ids)
        # Each (token, slot) is written once, then the k slots are summed in a fixed order: deterministic on GPU too.
        out = x.new_zeros(N * k, shape[-1])
        flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
        for e, expert in enumerate(self.experts):
            expert: Expert
            slots = (flat_ids == e).nonzero().squeeze(1)
            if slots.numel() == 0:
                continue
            out[slots] = expert(x[slots // k]) * flat_w[slots, None].to(x.dtype)
        y = out.view(N, k, -1).sum(1).view(shape)
        return y, self.aux_losses(logits, ids)

    def aux_losses(self, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Router z-loss (mean squared logsumexp) and Switch-style load balance E * sum_e f_e * P_e."""
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        probs = torch.softmax(logits, dim=-1)
        counts = torch.zeros_like(probs).scatter_(1, ids, 1.0).mean(0) / self.top_k
        lb = self.num_experts * (counts.detach() * probs.mean(0)).sum()
        return {"router_z_loss": z, "lb_loss": lb, "expert_load": counts.detach()}
