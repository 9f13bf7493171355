"""Turn the public dense base into a 2-expert FlexOlmo [public, new] whose new expert alone (with its router row and
bias) trains; everything else is frozen with requires_grad=False, so it has no gradient and no optimizer state.

Router rows: for each layer, the mean of the FFN's input (the hidden state the router sees) over a sample of tokens,
scaled to unit length: the public row from public data, the new row from the expert's domain. The public row stays
frozen; the new row and the expert bias (b < 0, starting at ``expert_bias_init``) train.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from flexmore.model import FlexOlmo, ModelConfig, build_model
from flexmore.model.experts import Ranks

TRAINABLE = ("ffn.experts.1.", "ffn.router.experts", "ffn.bias_raw")


@torch.no_grad()
def mean_ffn_inputs(model: FlexOlmo, batches, device) -> torch.Tensor:
    """(n_layers, d_model): unit-length mean FFN input per layer over the tokens of ``batches``."""
    L, d = model.cfg.n_layers, model.cfg.d_model
    sums = torch.zeros(L, d, dtype=torch.float64, device=device)
    count = [0]
    hooks = []
    for i, block in enumerate(model.blocks):
        def hook(_mod, args, i=i):
            h = args[0].reshape(-1, d)
            sums[i] += h.double().sum(0)
            if i == 0:
                count[0] += h.shape[0]
        hooks.append(block.ffn.register_forward_pre_hook(hook))
    try:
        was = model.training
        model.eval()
        for x, _ in batches:
            model(x.to(device))
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    if count[0] == 0:
        raise ValueError("no tokens to initialise the router rows from")
    return F.normalize((sums / count[0]).float(), dim=-1)


def expert_config(base: ModelConfig, name: str, kind: str, ranks: list[int], bias: bool = True,
                  bias_init: float = -1.0, route_loss: float = 0.0) -> ModelConfig:
    if kind not in ("full", "lowrank"):
        raise ValueError(f"expert.kind={kind!r}; allowed: full, lowrank")
    if base.num_experts != 1:
        raise ValueError(f"the base must be a dense model (num_experts=1), got num_experts={base.num_experts}")
    if kind == "lowrank":
        try:
            ranks = Ranks.of(ranks).as_list()
        except ValueError as e:
            raise ValueError(f"expert.{e}") from None
    return dataclasses.replace(
        base, num_experts=2, top_k=2, norm_topk_prob=False, expert_bias=bias, expert_bias_init=bias_init,
        router_z_loss_weight=1e-3, route_loss_weight=route_loss,
        lb_loss_weight=0.0, expert_names=["public", name], expert_kinds=["full", kind],
        expert_ranks=[[], ranks if kind == "lowrank" else []],
    )


def upcycle(base: FlexOlmo, cfg: ModelConfig, public_rows: torch.Tensor, domain_rows: torch.Tensor,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """The full state dict of the 2-expert model: base weights, expert 1 = copy of the public FFN (full) or the
    public FFN + B A with B = 0 (lowrank), router rows [public, domain], bias at its init. Equal to the base at step 0
    (both experts compute the public FFN, and the two probabilities sum to 1)."""
    model = build_model(cfg, device="cpu", seed=seed)
    base_sd = base.state_dict()
    sd = model.state_dict()
    for k, v in base_sd.items():
        sd[k] = v.detach().cpu().clone()
    with torch.no_grad():
        model.load_state_dict(sd)
        for i, block in enumerate(model.blocks):
            ffn = block.ffn
            if cfg.expert_kind(1) == "full":
                ffn.experts[1].load_state_dict(ffn.experts[0].state_dict())
            else:
                ffn.experts[1].reset_parameters(cfg.init_std)  # B = 0, dense projections = public
            ffn.router.public.copy_(public_rows[i][None])
            ffn.router.experts.copy_(domain_rows[i][None])  # the bias keeps build_model's expert_bias_init
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def is_trainable(name: str) -> bool:
    return any(t in name for t in TRAINABLE)
