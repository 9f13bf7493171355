"""Parameter and FLOP accounting: what start-up reports and what MFU divides by."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flexmore.model.moe import MoEFFN


@dataclass
class ParamCounts:
    total: int
    active: int  # per token: everything outside the MoE layers plus the top_k largest experts of each layer
    trainable: int
    embedding: int  # the input table: a lookup, no FLOPs

    def describe(self) -> str:
        def m(n: int) -> str:
            return f"{n / 1e6:,.2f}M"

        return (
            f"params: total {m(self.total)} | active/token {m(self.active)} | trainable {m(self.trainable)} "
            f"| frozen {m(self.total - self.trainable)}"
        )


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def count_params(model: nn.Module) -> ParamCounts:
    total = _numel(model.parameters())
    trainable = _numel(p for p in model.parameters() if p.requires_grad)
    inactive = 0
    for mod in model.modules():
        if isinstance(mod, MoEFFN) and mod.num_experts > mod.top_k:
            sizes = sorted((_numel(e.parameters()) for e in mod.experts), reverse=True)
            inactive += sum(sizes[mod.top_k :])
    embed = getattr(model, "embed", None)
    embedding = _numel(embed.parameters()) if embed is not None else 0
    return ParamCounts(total=total, active=total - inactive, trainable=trainable, embedding=embedding)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (active non-embedding params) + 12 x layers x width x seq_len (attention)."""
    counts = count_params(model)
    cfg = model.cfg
    return 6.0 * (counts.active - counts.embedding) + 12.0 * cfg.n_layers * cfg.d_model * seq_len
