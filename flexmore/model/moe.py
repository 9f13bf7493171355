"""FlexOlmo's MoE FFN: expert 0 is the public FFN, a bias-free linear router, softmax over all experts then top-k.

The non-public experts' logits get a learned bias b < 0, stored as ``bias_raw`` with b = -softplus(bias_raw): FlexOlmo's
``min(b, 0)`` has zero gradient once b drifts above 0 (it does, trained from 0), so the bias went dead; softplus keeps
a gradient at every value. Artifacts and merges carry b itself (``bias_to_raw`` / ``raw_to_bias``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexmore.model.config import BY_LIKELIHOOD, ModelConfig
from flexmore.model.experts import Expert, build_expert

BIAS_FLOOR = 1e-12  # |b| below this is stored as this: b = 0 exactly has no finite raw value


def raw_to_bias(raw: torch.Tensor) -> torch.Tensor:
    return -F.softplus(raw)


def bias_to_raw(b: torch.Tensor) -> torch.Tensor:
    """The raw value of a bias b <= 0 (a positive b, FlexOlmo's inert clamp region, counts as 0)."""
    mag = (-b.double()).clamp(min=BIAS_FLOOR)
    return torch.where(mag > 30, mag, torch.log(torch.expm1(mag))).to(b.dtype)


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


def with_public(logits: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (N, 2), ids (N, 2)): the public expert and ``choice`` (N,), mixed by the token's softmax over the
    two logits (the prefix and sequence rules)."""
    ids = torch.stack([torch.zeros_like(choice), choice], dim=-1)
    return torch.softmax(logits.gather(1, ids), dim=-1), ids


def most_so_far(mass: torch.Tensor, valid: torch.Tensor | None,
                carried: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the non-public expert (N,) with the most ``mass`` (B, T, E - 1) summed over the real tokens of its
    sequence so far (``valid`` (B, T); ``carried`` (B, E - 1): the sums of the tokens before, from a KV cache), ties
    to the lowest index; and the sums at the last token, to carry on."""
    if valid is not None:
        mass = mass * valid[..., None].to(mass.dtype)
    total = mass.cumsum(1)
    if carried is not None:
        total = total + carried[:, None]
    return total.argmax(-1).view(-1) + 1, total[:, -1]


class MoEFFN(nn.Module):
    """Routes each token to top-k experts and sums their outputs weighted by the (unrenormalised) router probability.

    With one expert there is no router: the layer is the dense FFN, so a dense model is the E = 1 case and upcycling
    keeps expert 0's parameter names.
    """

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.top_k, cfg.norm_topk_prob
        self.route_context = cfg.route_context
        experts = [build_expert("full", cfg.d_model, cfg.d_ffn, device)]
        for e in range(1, cfg.num_experts):
            experts.append(build_expert(cfg.expert_kind(e), cfg.d_model, cfg.d_ffn, device, public=experts[0],
                                        ranks=cfg.expert_rank(e)))
        self.experts = nn.ModuleList(experts)
        self.router = Router(cfg.d_model, cfg.num_experts, device=device) if cfg.is_moe else None
        self.bias_init = cfg.expert_bias_init
        # b < 0 for experts 1..E-1 only: the public expert's logit is never biased.
        self.bias_raw = (
            nn.Parameter(torch.empty(cfg.num_experts - 1, device=device)) if cfg.is_moe and cfg.expert_bias else None
        )

    def reset_parameters(self, std: float) -> None:
        for e in self.experts:
            e.reset_parameters(std)
        if self.router is not None:
            for w in (self.router.public, self.router.experts):
                nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
        if self.bias_raw is not None:
            with torch.no_grad():
                self.bias_raw.copy_(bias_to_raw(torch.full_like(self.bias_raw, self.bias_init)))

    def expert_bias(self) -> torch.Tensor | None:
        """b (E - 1,), every entry < 0; None without a bias."""
        return None if self.bias_raw is None else raw_to_bias(self.bias_raw)

    def router_logits(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, E) in at least fp32, with b added to the non-public experts; -inf where ``present`` (N, E) is
        False, so the router's softmax is the one of the model with those experts opted out."""
        logits = self.router(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.bias_raw is not None:
            zero = torch.zeros(1, device=logits.device, dtype=logits.dtype)
            logits = logits + torch.cat([zero, raw_to_bias(self.bias_raw.to(logits.dtype))])
        if present is not None:
            logits = logits.masked_fill(~present, float("-inf"))
        return logits

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k), expert ids (N, k)), sorted by probability, without renormalisation unless configured."""
        probs = torch.softmax(logits, dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, ids

    def prefix_routing(self, logits: torch.Tensor, batch: int, valid: torch.Tensor | None,
                       cache: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """route_context="prefix": (weights (N, 2), ids (N, 2)) = the public expert and, per token, the expert with
        the most router probability summed over its sequence so far (padding left out; with a KV cache, the sums of
        the tokens before), the two mixed by the token's softmax over their logits."""
        probs = torch.softmax(logits, dim=-1).view(batch, -1, self.num_experts)[..., 1:]
        choice, sums = most_so_far(probs, valid, None if cache is None else cache[0].routes[cache[1]])
        if cache is not None:
            cache[0].routes[cache[1]] = sums
        return with_public(logits, choice)

    def forward(self, x: torch.Tensor, hold: torch.Tensor | None = None, route_targets: torch.Tensor | None = None,
                present: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                cache: tuple | None = None,
                choice: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``hold`` (N,) bool over the flattened tokens: there the non-public experts' outputs are detached, so those
        tokens train the router (and bias) but not the experts (public negatives in router-only mode).
        ``route_targets`` (N,) long: the expert each token belongs to (-1: none), for the routing loss
        (``route_loss``: cross-entropy of the router's softmax against it).
        ``present`` (N, E) bool: the experts each token may use (router tuning that rehearses opt-outs).
        ``valid`` (B, T) bool: real tokens (False: padding), and ``cache`` (KVCache, layer): for prefix routing.
        ``choice`` (N,) long, route_context="sequence" (or "likelihood" / "posterior"): each token's non-public expert
        (``FlexOlmo.sequence_choice``; the likelihood rule's pass of one expert);
        without it the layer routes by token and reports each token's probabilities (``token_probs``) for the choice."""
        if self.router is None:
            return self.experts[0](x), {}
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router_logits(x, present)
        if self.route_context == "prefix":
            if len(shape) != 3:
                raise ValueError(f"route_context='prefix' routes by sequence: the input must be (B, T, d), got "
                                 f"{tuple(shape)}")
            weights, ids = self.prefix_routing(logits, shape[0], valid, cache)
        elif choice is not None:
            weights, ids = with_public(logits, choice)
        else:
            weights, ids = self.routing(logits)
        N, k = ids.shape

        def run(e: int, expert: Expert, xs: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
            y = expert(xs)
            return y if held is None or e == 0 else torch.where(held[:, None], y.detach(), y)

        if k == self.num_experts:  # every expert sees every token (FlexOlmo's 2-of-2): no gather, no graph breaks
            w = weights.new_zeros(N, k).scatter_(1, ids, weights).to(x.dtype)
            y = sum(run(e, expert, x, hold) * w[:, e, None] for e, expert in enumerate(self.experts))
            return y.view(shape), self._aux(logits, ids, weights, route_targets, choice)
        # Each (token, slot) is written once, then the k slots are summed in a fixed order: deterministic on GPU too.
        out = x.new_zeros(N * k, shape[-1])
        flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
        for e, expert in enumerate(self.experts):
            expert: Expert
            slots = (flat_ids == e).nonzero().squeeze(1)
            if slots.numel() == 0:
                continue
            tok = slots // k
            out[slots] = run(e, expert, x[tok], None if hold is None else hold[tok]) * flat_w[slots, None].to(x.dtype)
        y = out.view(N, k, -1).sum(1).view(shape)
        return y, self._aux(logits, ids, weights, route_targets, choice)

    def _aux(self, logits, ids, weights, route_targets, choice) -> dict[str, torch.Tensor]:
        aux = self.aux_losses(logits, ids, route_targets)
        if self.route_context == "sequence" and choice is None:  # the first pass: what the choice is made from
            aux["token_probs"] = torch.softmax(logits, dim=-1).detach()
        if self.route_context in BY_LIKELIHOOD and choice is not None:  # each token's weights on (public, its e)
            aux["token_weights"] = torch.zeros_like(logits).scatter_(1, ids, weights.to(logits.dtype)).detach()
        return aux

    def aux_losses(self, logits: torch.Tensor, ids: torch.Tensor,
                   route_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Router z-loss (mean squared logsumexp) and Switch-style load balance E * sum_e f_e * P_e; for diagnostics,
        each expert's mean probability (``expert_prob``) and the fraction of tokens whose top-k holds it
        (``expert_topk``)."""
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, ids, 1.0).mean(0)
        counts = chosen / ids.shape[1]
        lb = self.num_experts * (counts.detach() * probs.mean(0)).sum()
        aux = {"router_z_loss": z, "lb_loss": lb, "expert_load": counts.detach(),
               "expert_prob": probs.mean(0).detach(), "expert_topk": chosen.detach()}
        if route_targets is not None:
            aux["route_loss"] = F.cross_entropy(logits, route_targets, ignore_index=-1)
        return aux
