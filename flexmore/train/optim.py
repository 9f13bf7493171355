"""AdamW with decay only on matrices, and a warm-up + cosine schedule that is a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from flexdemo import FlexDeMo
from flexdemo.link import LinkCap
from flexmore.config import OptimConfig
from flexmore.parallel.strategy import get_strategy


def param_groups(model: nn.Module, weight_decay: float, edge_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on 2-D weights except the embedding table; none on norms and biases. Frozen tensors are left out.
    With ``edge_lr_scale`` != 1 the embedding, lm_head and 1-D tensors (which a sign update moves as far per step
    as any matrix) are groups of their own at that multiple of the learning rate (``lr_scale``)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.startswith("embed.")
        edge = edge_lr_scale != 1.0 and (p.ndim < 2 or name.startswith(("embed.", "lm_head.")))
        groups.setdefault((decay, edge), []).append(p)
    out = [{"params": groups.get((True, False), []), "weight_decay": weight_decay},
           {"params": groups.get((False, False), []), "weight_decay": 0.0}]
    out += [{"params": groups[(decay, True)], "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": edge_lr_scale} for decay in (True, False) if groups.get((decay, True))]
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, replicate_group=None,
                    link: LinkCap | None = None) -> torch.optim.Optimizer:
    """AdamW (fused on GPU), or FlexDeMo exchanging over ``replicate_group`` (through ``link``, if capped) for demo /
    flexdemo."""
    groups = param_groups(model, cfg.weight_decay, cfg.edge_lr_scale)
    if get_strategy(cfg.name).dense_sync:  # HSDP: plain AdamW on the all-reduced gradients
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adamw.betas), eps=cfg.adamw.eps, fused=device.type == "cuda")

    demo = cfg.demo_config()
    if demo.overlap != "layerwise":
        return FlexDeMo(groups, replicate_group=replicate_group, lr=cfg.lr, config=demo, link=link)
    trained = {id(p) for g in groups for p in g["params"]}
    layers = [(m, [p for p in ps if id(p) in trained]) for m, ps in layer_buckets(model)]
    layers = [(m, ps) for m, ps in layers if ps]
    opt = FlexDeMo(groups, replicate_group=replicate_group, lr=cfg.lr, config=demo, link=link,
                   buckets=[ps for _, ps in layers])
    opt.attach([m for m, _ in layers])
    return opt


def layer_buckets(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """The exchange's buckets for overlap="layerwise", in forward order, each with the module whose forward needs
    it first: the embedding (with any tensor outside the layers), each block, then the final norm with lm_head.
    Under FSDP the root gathers the embedding, norm and lm_head before any forward of its own, so those make one
    first bucket, applied before the model's forward."""
    if not all(hasattr(model, a) for a in ("embed", "blocks", "norm", "lm_head")):
        return [(model, list(model.parameters()))]  # another model: one bucket, applied before its forward
    blocks = [(b, list(b.parameters())) for b in model.blocks]
    tail = list(model.norm.parameters()) + list(model.lm_head.parameters())
    placed = {id(p) for _, ps in blocks for p in ps} | {id(p) for p in tail}
    head = [p for p in model.parameters() if id(p) not in placed]
    if any(hasattr(p, "to_local") for p in model.parameters()):  # FSDP2: the root's parameters first
        return [(model, head + tail)] + blocks
    return [(model.embed, head)] + blocks + [(model.norm, tail)]


class LRSchedule:
    """Linear warm-up to ``lr``, then cosine down to ``min_lr_ratio * lr`` at ``total_steps`` (or constant)."""

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.cfg, self.total = cfg, total_steps

    def __call__(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        span = max(1, self.total - c.warmup_steps)
        t = min(1.0, (step - c.warmup_steps) / span)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    @staticmethod
    def apply(optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
