"""Model shape: one dataclass, validated on construction so a bad shape fails before any weight exists."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from flexmore.model.experts import Ranks

ROUTE_CONTEXTS = ("token", "prefix", "sequence", "likelihood", "posterior")
BY_LIKELIHOOD = ("likelihood", "posterior")  # rules that run every two-expert model and weigh them by their fit


@dataclass
class ModelConfig:
    """An OLMo2 / FlexOlmo decoder. ``num_experts == 1`` is the dense model."""

    name: str = "tiny"
    vocab_size: Optional[int] = None  # None: taken from the tokenizer, padded to ``vocab_multiple``
    vocab_multiple: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (multi-head attention)
    d_ffn: int = 192
    max_seq_len: int = 256
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Mixture of experts (FlexOlmo). Expert 0 is the public FFN.
    num_experts: int = 1
    top_k: int = 1
    norm_topk_prob: bool = False  # FlexOlmo: softmax over all experts, top-k, no renormalisation
    # "token": each token routed by its own router logits (FlexOlmo). "prefix": each token uses the public expert and
    # one other, the one with the most router probability over the sequence so far (a domain decided by context),
    # mixed by the token's own softmax over the two: a sequence of one domain gets that expert's two-expert model,
    # and opting another expert out cannot change it. "sequence": the same pair, but the other expert is chosen once
    # for every layer, by the router probability summed over all layers (of a first, token-routed pass) and over the
    # sequence so far, so one layer's poor router cannot send a whole sequence to the wrong expert (two passes).
    # "likelihood": no router decides the expert: one pass per non-public expert e, every token on the pair (public,
    # e), i.e. e's two-expert model; each token takes its logits from the pass whose model gave the sequence's real
    # tokens so far the highest likelihood (the domain posterior of DEMix / BTM ensembles, made a hard choice), so a
    # sequence another expert predicts worse is never touched by it (E - 1 passes). "posterior": the same passes,
    # each token's next-token distribution the mixture of theirs weighted by that posterior (uniform prior): a
    # Bayesian mixture, whose log-likelihood of a sequence is within log(E - 1) of its best two-expert model's.
    route_context: str = "token"
    expert_bias: bool = False  # learned bias b < 0 (b = -softplus(raw)) on the non-public experts' logits
    expert_bias_init: float = -1.0  # b of a fresh expert
    router_z_loss_weight: float = 0.0
    lb_loss_weight: float = 0.0
    route_loss_weight: float = 0.0  # x the router's cross-entropy against rows' known experts (route_targets)
    expert_names: list[str] = field(default_factory=list)  # optional, one per expert; "public" first
    # Per expert (empty: all "full"): "full" (own FFN) or "lowrank" (W_public + B A inside the SwiGLU); expert 0,
    # the public FFN, is always full. expert_ranks[e] = [gate, up, down] ranks of a lowrank expert ([] for full).
    expert_kinds: list[str] = field(default_factory=list)
    expert_ranks: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"model '{self.name}': {msg}")

        for key in ("d_model", "n_layers", "n_heads", "d_ffn", "max_seq_len", "num_experts", "top_k", "vocab_multiple"):
            need(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        need(self.vocab_size is None or self.vocab_size >= 1, f"vocab_size={self.vocab_size} must be >= 1 or null")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        kv = self.kv_heads
        need(kv >= 1 and self.n_heads % kv == 0, f"n_kv_heads={kv} must divide n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(
            self.top_k <= self.num_experts,
            f"top_k={self.top_k} is larger than num_experts={self.num_experts}; allowed: 1..{self.num_experts}",
        )
        need(
            not self.expert_names or len(self.expert_names) == self.num_experts,
            f"expert_names has {len(self.expert_names)} names for num_experts={self.num_experts}",
        )
        need(self.route_context in ROUTE_CONTEXTS,
             f"route_context={self.route_context!r}; allowed: {', '.join(ROUTE_CONTEXTS)}")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        need(self.expert_bias_init < 0, f"expert_bias_init={self.expert_bias_init} must be < 0 (b = -softplus(raw))")
        if self.expert_kinds:
            need(len(self.expert_kinds) == self.num_experts,
                 f"expert_kinds has {len(self.expert_kinds)} entries for num_experts={self.num_experts}")
            need(self.expert_kinds[0] == "full", f"expert 0 (the public FFN) must be 'full', got {self.expert_kinds[0]!r}")
            for e, kind in enumerate(self.expert_kinds):
                need(kind in ("full", "lowrank"), f"expert_kinds[{e}]={kind!r}; allowed: 'full', 'lowrank'")
            need(len(self.expert_ranks) == self.num_experts,
                 f"expert_ranks has {len(self.expert_ranks)} entries for num_experts={self.num_experts}")
            for e, (kind, ranks) in enumerate(zip(self.expert_kinds, self.expert_ranks)):
                if kind == "lowrank":
                    need(len(ranks) == 3, f"expert_ranks[{e}]={list(ranks)}: give three ranks (gate, up, down)")
                    try:
                        Ranks.of(ranks)
                    except ValueError as err:
                        need(False, f"expert_ranks[{e}]: {err}")
        else:
            need(not self.expert_ranks, "expert_ranks given without expert_kinds")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def expert_kind(self, e: int) -> str:
        return self.expert_kinds[e] if self.expert_kinds else "full"

    def expert_rank(self, e: int) -> list[int]:
        return list(self.expert_ranks[e]) if self.expert_kinds else []

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    def resolved_vocab(self, tokenizer_vocab: int) -> int:
        """The embedding size: explicit, or the tokenizer's padded up to ``vocab_multiple``."""
        if self.vocab_size is not None:
            if self.vocab_size < tokenizer_vocab:
                raise ValueError(
                    f"model '{self.name}': vocab_size={self.vocab_size} is smaller than the tokenizer's "
                    f"vocabulary ({tokenizer_vocab} ids)"
                )
            return self.vocab_size
        m = self.vocab_multiple
        return (tokenizer_vocab + m - 1) // m * m

    def shape_dict(self) -> dict:
        """What must match between a checkpoint and the model that loads it."""
        d = asdict(self)
        for k in ("name", "init_std", "router_z_loss_weight", "lb_loss_weight", "norm_topk_prob", "vocab_multiple",
                  "expert_bias_init", "route_loss_weight", "route_context"):
            d.pop(k)
        return d
