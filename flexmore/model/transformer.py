"""The FlexOlmo decoder: OLMo2 blocks (reordered norm) whose FFN is a FlexOlmo MoE."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flexmore.model.config import BY_LIKELIHOOD, ModelConfig
from flexmore.model.layers import Attention, KVCache, RMSNorm, rope_tables
from flexmore.model.moe import MoEFFN, most_so_far


class Block(nn.Module):
    """h = x + norm(attn(x)); out = h + norm(ffn(h)): the norm sits on the sublayer output (OLMo2)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.attn = Attention(cfg, device=device)
        self.post_attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps, device=device)
        self.ffn = MoEFFN(cfg, device=device)
        self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, device=device)

    def forward(self, x, cos, sin, mask=None, hold=None, route_targets=None, present=None, cache=None, valid=None,
                choice=None):
        h = x + self.post_attention_norm(self.attn(x, cos, sin, mask, cache))
        f, aux = self.ffn(h, hold, route_targets, present, valid, cache, choice)
        return h + self.post_ffn_norm(f), aux


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # cross-entropy + weighted router losses: what backward() takes
    ce_loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class FlexOlmo(nn.Module):
    """Token embedding, blocks, final norm, untied lm_head. Build on meta, then ``to_empty`` + ``init_weights``."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved (cfg.resolved_vocab) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, device=device)
        self.blocks = nn.ModuleList(Block(cfg, device=device) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, device=device)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device=device)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and the RoPE tables; works after ``to_empty`` from meta."""
        gen_state = None
        if seed is not None:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
        std = self.cfg.init_std
        nn.init.trunc_normal_(self.embed.weight, std=std, a=-3 * std, b=3 * std)
        for block in self.blocks:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj):
                nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
            for norm in (block.attn.q_norm, block.attn.k_norm, block.post_attention_norm, block.post_ffn_norm):
                norm.reset_parameters()
            block.ffn.reset_parameters(std)
        self.norm.reset_parameters()
        nn.init.trunc_normal_(self.lm_head.weight, std=std, a=-3 * std, b=3 * std)
        self.init_rope()
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)

    @torch.no_grad()
    def init_rope(self) -> None:
        """Recompute the RoPE tables (non-persistent buffers: ``to_empty`` leaves them unset)."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, hold_rows: torch.Tensor | None = None,
                route_targets: torch.Tensor | None = None, present_rows: torch.Tensor | None = None,
                cache: KVCache | None = None, route_evidence: torch.Tensor | None = None) -> ModelOutput:
        """``attention_mask`` (B, T), True on real tokens, for left-padded batches (generation): keys that are padding
        are masked out. RoPE is relative, so a left-padded row gives the logits it would give unpadded.
        ``hold_rows`` (B,) bool: rows on which the non-public experts are held fixed (only the router learns there).
        ``route_targets`` (B,) long: the expert each row belongs to (-1: none); adds ``route_loss_weight`` x the
        router's cross-entropy against it, averaged over layers.
        ``present_rows`` (B, E) bool: the experts each row may use; the others are routed as if opted out.
        ``cache``: ``input_ids`` continue the sequences whose keys it holds (greedy decoding without recomputing
        the prefix); ``attention_mask`` then covers the cached tokens and the new ones.
        ``route_evidence`` (B, T) bool, route_context "likelihood" / "posterior" only: the tokens whose likelihood
        chooses the expert (default: every real token). Scoring given continuations marks the context only, so a
        continuation cannot pick the expert that scores it; other rules ignore it.

        ``aux`` holds the router losses and routing statistics averaged over layers, and per layer (L, E):
        ``layer_expert_prob`` (mean router probability) and ``layer_expert_topk`` (fraction of tokens routed)."""
        T = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.embed(input_ids)
        mask = None
        if attention_mask is not None or start:
            keys = start + T
            if attention_mask is None:
                attention_mask = torch.ones(input_ids.shape[0], keys, dtype=torch.bool, device=x.device)
            causal = torch.ones(keys, keys, dtype=torch.bool, device=x.device).tril()[start:]
            own = torch.eye(keys, dtype=torch.bool, device=x.device)[start:]
            # pads still see themselves, so no row is fully masked (their outputs are never used)
            mask = (causal & attention_mask[:, None, None, :].bool()) | own
        hold = None if hold_rows is None else hold_rows.to(x.device).bool().repeat_interleave(T)
        targets = None if route_targets is None else route_targets.to(x.device).long().repeat_interleave(T)
        present = None if present_rows is None else present_rows.to(x.device).bool().repeat_interleave(T, dim=0)
        valid = None if attention_mask is None else attention_mask[:, start:].to(x.device).bool()  # the new tokens
        if self.cfg.route_context in BY_LIKELIHOOD and self.cfg.is_moe:
            if hold_rows is not None or route_targets is not None:  # nothing routes by the router there to train
                raise ValueError(f"route_context={self.cfg.route_context!r} evaluates a merged mixture; train with "
                                 "route_context='token' (router tuning switches to it by itself)")
            evidence = None if route_evidence is None else route_evidence.to(x.device).bool()
            logits, aux_layers = self.likelihood_route(input_ids, x, cos, sin, mask, present, cache, valid, evidence)
        else:
            choice = None
            if self.cfg.route_context == "sequence" and self.cfg.is_moe:
                choice = self.sequence_choice(x, cos, sin, mask, present, cache, valid)
            x, aux_layers = self._blocks(x, cos, sin, mask, hold, targets, present, cache, valid, choice)
            logits = self.lm_head(self.norm(x))
        aux_mean = {k: sum(v) / len(self.blocks) for k, v in aux_layers.items()}
        for k in ("expert_prob", "expert_topk"):
            if k in aux_layers:
                aux_mean[f"layer_{k}"] = torch.stack(aux_layers[k])
        if labels is None:
            return ModelOutput(logits=logits, aux=aux_mean)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss = ce
        if "router_z_loss" in aux_mean:
            loss = loss + self.cfg.router_z_loss_weight * aux_mean["router_z_loss"]
            loss = loss + self.cfg.lb_loss_weight * aux_mean["lb_loss"]
        if "route_loss" in aux_mean and self.cfg.route_loss_weight:
            loss = loss + self.cfg.route_loss_weight * aux_mean["route_loss"]
        return ModelOutput(logits=logits, loss=loss, ce_loss=ce, aux=aux_mean)

    def _blocks(self, x, cos, sin, mask, hold, targets, present, cache, valid, choice):
        aux_layers: dict[str, list[torch.Tensor]] = {}
        for i, block in enumerate(self.blocks):
            x, aux = block(x, cos, sin, mask, hold, targets, present, None if cache is None else (cache, i), valid,
                           choice)
            for k, v in aux.items():
                aux_layers.setdefault(k, []).append(v)
        return x, aux_layers

    @torch.no_grad()
    def sequence_choice(self, x, cos, sin, mask, present, cache, valid) -> torch.Tensor:
        """route_context="sequence": each token's non-public expert (N,), the one with the most router probability
        summed over every layer of a token-routed pass and over the real tokens of its sequence so far (itself
        included; ties: the lowest index). With a KV cache, that pass keeps its own keys and the sums
        (``KVCache.shadow``, ``sequence_routes``), so decoding token by token chooses as one pass over everything."""
        shadow = None
        if cache is not None:
            cache.shadow = cache.shadow or KVCache(self.cfg.n_layers)
            shadow = cache.shadow
        _, aux = self._blocks(x, cos, sin, mask, None, None, present, shadow, valid, None)
        B, T = x.shape[:2]
        mass = torch.stack(aux["token_probs"]).sum(0).view(B, T, -1)[..., 1:]
        choice, sums = most_so_far(mass, valid, None if cache is None else cache.sequence_routes)
        if cache is not None:
            cache.sequence_routes = sums
        return choice

    def _pair_passes(self, x, cos, sin, mask, present, cache, valid):
        """One pass per non-public expert e with every token on the pair (public, e): logits (E - 1, B, T, V) and
        each pass's per-layer pair weights (E - 1, L, N, E)."""
        B, T = x.shape[:2]
        E = self.cfg.num_experts
        if cache is not None and cache.passes is None:
            cache.passes = [KVCache(self.cfg.n_layers) for _ in range(E - 1)]
        logits, weights = [], []
        for e in range(1, E):
            pair = torch.full((B * T,), e, dtype=torch.long, device=x.device)
            kv = None if cache is None else cache.passes[e - 1]
            h, aux = self._blocks(x, cos, sin, mask, None, None, present, kv, valid, pair)
            logits.append(self.lm_head(self.norm(h)))
            weights.append(torch.stack(aux["token_weights"]))  # (L, N, E)
        return torch.stack(logits), torch.stack(weights)

    @torch.no_grad()
    def pair_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(E - 1, B, T, V): each two-expert model's (public, e) log-probabilities of the next token, the passes that
        likelihood routing weighs; a caller that groups sequences (the choices of one question) picks one pair for
        the group from these (``request_logprobs(evidence="item")``)."""
        if not self.cfg.is_moe or self.cfg.route_context not in BY_LIKELIHOOD:
            raise ValueError(f"pair_logprobs needs a mixture routed by likelihood; route_context="
                             f"{self.cfg.route_context!r}, {self.cfg.num_experts} expert(s)")
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        logits, _ = self._pair_passes(x, self.rope_cos[:T], self.rope_sin[:T], None, None, None, None)
        return torch.log_softmax(logits.float(), dim=-1)

    def likelihood_route(self, input_ids, x, cos, sin, mask, present, cache, valid, evidence=None):
        """route_context="likelihood" / "posterior": (logits (B, T, V), per-layer aux). One pass per non-public
        expert e with every token on the pair (public, e); each pass's model scores the real tokens of the sequence
        so far (each token included: log p_e(x_t | x_<t)). "likelihood": each token's logits come from the pass with
        the highest score (ties to the lowest index, so with no evidence yet, a sequence's first real token, expert
        1's pass). "posterior": its log-probabilities are those of the passes' mixture weighted by softmax(score)
        (uniform prior); only the tokens marked in ``evidence`` (default all) add to the scores. An opted-out expert
        (``present``) gets no weight. With a KV cache every pass keeps its own keys, and the scores and the last
        token's log-probabilities are carried, so decoding token by token gives what one pass over everything gives."""
        B, T = input_ids.shape
        E = self.cfg.num_experts
        logits, weights = self._pair_passes(x, cos, sin, mask, present, cache, valid)
        logp = torch.log_softmax(logits.float(), dim=-1)
        with torch.no_grad():
            real = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid
            counted = real if evidence is None else real & evidence
            gain = torch.zeros(E - 1, B, T, device=x.device)  # log p_e(x_t | x_<t), where both tokens are real
            nxt = input_ids[None, :, 1:, None].expand(E - 1, B, T - 1, 1)
            gain[:, :, 1:] = logp[:, :, :-1].gather(-1, nxt).squeeze(-1) * (counted[:, 1:] & real[:, :-1])
            if cache is not None and cache.last_logp is not None:  # the first new token, scored by the last old one
                first = cache.last_logp.gather(-1, input_ids[None, :, :1].expand(E - 1, B, 1)).squeeze(-1)
                gain[:, :, 0] = first * counted[:, 0]
            score = gain.cumsum(2)
            if cache is not None and cache.likelihood is not None:
                score = score + cache.likelihood[:, :, None]
            if present is not None:  # (N, E), the same for every token of a row
                score = score.masked_fill(~present.view(B, T, E)[:, :1, 1:].permute(2, 0, 1), float("-inf"))
            if cache is not None:
                cache.likelihood = score[:, :, -1].masked_fill(score[:, :, -1].isinf(), 0.0)
                cache.last_logp = logp[:, :, -1] * real[None, :, -1, None]
            if self.cfg.route_context == "likelihood":  # one pass per token: ties to the first maximum
                share = torch.zeros_like(score).scatter_(0, score.argmax(0, keepdim=True), 1.0)
            else:  # (E - 1, B, T): each pass's weight per token; every expert opted out: all passes are public's
                share = torch.softmax(score.masked_fill(score.isinf().all(0), 0.0), dim=0)
        if self.cfg.route_context == "likelihood":
            V = logits.shape[-1]
            out = logits.gather(0, share.argmax(0)[None, :, :, None].expand(1, B, T, V)).squeeze(0)
        else:  # log sum_e w_e p_e: log-probabilities (what cross-entropy and argmax read as logits)
            out = torch.logsumexp(logp + share.log()[..., None], dim=0)
        # per layer, the weight each expert gets: each pass's pair weights times the pass's share
        flat = share.view(E - 1, 1, B * T, 1)
        mass = (weights * flat).sum(0)  # (L, N, E)
        held = torch.cat([torch.ones_like(flat[:1, 0]), flat[:, 0]]).squeeze(-1).T  # (N, E): public 1, e its share
        aux_layers = {"expert_prob": list(mass.mean(1)), "expert_topk": [held.mean(0)] * len(self.blocks)}
        return out, aux_layers


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = 0) -> FlexOlmo:
    """Construct on the meta device (no memory), then materialise on ``device`` and initialise."""
    with torch.device("meta"):
        model = FlexOlmo(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
