"""The router of a merged model, fitted after merging without touching any expert: FlexOlmo's optional router tuning
on a small proxy mix, and the no-training nearest-centroid router (a reference point).

Each expert's row was trained against the public expert alone, so in a merged model the rows have never competed
with each other. Tuning trains only the router rows and biases, top-k = all, on public data plus a small sample that
each owner contributes (a few thousand sequences at most): no owner's full data is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flexmore.data.embedded import embedded_path
from flexmore.data.loader import first_windows
from flexmore.data.shards import TokenStream
from flexmore.experts.artifact import base_hash
from flexmore.model import FlexOlmo
from flexmore.model.moe import BIAS_FLOOR, bias_to_raw

ROUTER_PARAMS = (".ffn.router.public", ".ffn.router.experts", ".ffn.bias_raw")
MAX_SEQS = 4096  # the most sequences of one owner's sample that tuning reads


def is_router(name: str) -> bool:
    return name.endswith(ROUTER_PARAMS)


def frozen_part_hash(model: FlexOlmo) -> str:
    """sha256 of every tensor that router fitting must leave bit-identical (all but router rows and biases)."""
    return base_hash({k: v for k, v in model.state_dict().items() if not is_router(k)})



def load_sample(spec: str, tokenizer, seq_len: int, max_seqs: int) -> torch.Tensor:
    """An owner's sample: a shard folder (flexmore-prep), or ``embedded:DOMAIN`` (that domain's training split)."""
    if spec.startswith("embedded:"):
        chars = max_seqs * (seq_len + 1) * 4 + 10_000  # enough for max_seqs windows at >= 1 token per 4 characters
        stream = TokenStream([embedded_path(spec.split(":", 1)[1], "train", tokenizer, chars, 0)])
    else:
        stream = TokenStream([spec])
    if stream.tokenizer != tokenizer.name:
        raise ValueError(f"sample {spec} was tokenised with {stream.tokenizer!r}, not {tokenizer.name!r}")
    return first_windows(stream, seq_len, max_seqs)  # an owner's contributed sample


def own_sample_spec(domain: str) -> str:
    """An owner's default sample: its expert's training data as the manifest records it (``domain``: shard folders or
    embedded domain names, comma-separated; the first is used)."""
    first = domain.split(",")[0]
    return first if "/" in first or Path(first).is_dir() else f"embedded:{first}"


def check_samples(model: FlexOlmo, samples: dict[str, torch.Tensor]) -> list[str]:
    """Sample names must be the merged model's expert names (``public`` included), one sample per expert."""
    names = model.cfg.expert_names
    if model.cfg.num_experts < 2 or not names:
        raise ValueError("router fitting needs a merged model with named experts (made by flexmore-merge)")
    unknown = sorted(set(samples) - set(names))
    missing = [n for n in names if n not in samples]
    if unknown or missing:
        raise ValueError(f"samples given for {sorted(samples)}; the model's experts are {names}"
                         + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else ""))
    return names


@dataclass
class TuneConfig:
    steps: int = 200
    lr: float = 3e-3
    micro_batch: int = 16  # sequences per step, split evenly over the samples (round robin over the rest)
    weight_decay: float = 0.0
    # Defaults: the measured recipe (benchmarks/HISTORY.md, "Merged FlexMoRE mixtures"); FlexOlmo's is route_loss=0,
    # drop=0.
    route_loss: float = 1.0  # > 0: also x the router's cross-entropy against each row's owner (its sample's expert)
    drop: float = 0.25  # each non-public expert is absent from a row with this probability (rehearses opt-outs)
    seed: int = 0
    public_row: bool = True  # False: the public row stays as it is (one expert's refit: every artifact shares it)

    def __post_init__(self) -> None:
        for k in ("steps", "micro_batch"):
            if getattr(self, k) < 1:
                raise ValueError(f"router tuning: {k}={getattr(self, k)} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"router tuning: lr={self.lr} must be a finite number > 0")
        if not (self.route_loss >= 0 and math.isfinite(self.route_loss)):
            raise ValueError(f"router tuning: route_loss={self.route_loss} must be a finite number >= 0")
        if not 0 <= self.drop < 1:
            raise ValueError(f"router tuning: drop={self.drop} must be in [0, 1)")


def tune_router(model: FlexOlmo, samples: dict[str, torch.Tensor], tc: TuneConfig, device: torch.device,
                log=print) -> dict:
    """Train only router rows and biases of ``model`` (in place) with every expert active, on an equal mix of the
    samples (name -> (n, T + 1) windows). With ``tc.drop`` > 0 each row sees a random subset of the experts (the
    public one always), routed exactly as the model with the others opted out: the router then learns not to lean
    on an expert that its domain's tokens do not belong to, so an opt-out leaves the other domains where they were.
    Returns the first and last losses and the frozen part's hash, checked unchanged."""
    names = check_samples(model, samples)
    before = frozen_part_hash(model)
    model.to(device).train()
    params = []
    for name, p in model.named_parameters():
        train = is_router(name) and (tc.public_row or not name.endswith(".ffn.router.public"))
        p.requires_grad_(train)
        if train:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    top_k = {id(b.ffn): b.ffn.top_k for b in model.blocks}
    cfg = model.cfg
    model.cfg = replace(cfg, route_context="token")  # any other rule (prefix, sequence, likelihood, ...) is tuned as token routing
    for b in model.blocks:
        b.ffn.top_k = b.ffn.num_experts  # FlexOlmo tunes with every expert active
        b.ffn.route_context = "token"
    losses = []
    try:
        for step in range(tc.steps):
            rows, owners = [], []
            for j in range(tc.micro_batch):
                owner = (step * tc.micro_batch + j) % len(names)
                src = samples[names[owner]]
                rows.append(src[torch.randint(len(src), (1,), generator=gen)].squeeze(0))
                owners.append(owner)
            batch = torch.stack(rows).to(device)
            targets, present = torch.tensor(owners), None
            if tc.drop > 0:
                present = torch.rand(len(rows), len(names), generator=gen) >= tc.drop
                present[:, 0] = True
                targets = torch.where(present[torch.arange(len(rows)), targets], targets, -1)  # owner absent: no target
            lr = tc.lr * min(1.0, (step + 1) / max(1, tc.steps // 10))
            for g in opt.param_groups:
                g["lr"] = lr
            out = model(batch[:, :-1], batch[:, 1:], route_targets=targets.to(device), present_rows=present)
            loss = out.loss + tc.route_loss * out.aux["route_loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"router tuning: loss is {loss.item()} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(out.ce_loss.item())
            if log and (step + 1) % max(1, tc.steps // 5) == 0:
                log(f"router tuning step {step + 1}/{tc.steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    finally:
        model.cfg = cfg
        for b in model.blocks:
            b.ffn.top_k = top_k[id(b.ffn)]
            b.ffn.route_context = cfg.route_context
        for p in model.parameters():
            p.requires_grad_(False)
    after = frozen_part_hash(model)
    if after != before:  # cannot happen unless a non-router tensor was trained: never write such a model
        raise RuntimeError("router tuning changed a tensor outside the router; nothing written")
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    return {"steps": tc.steps, "lr": tc.lr, "micro_batch": tc.micro_batch, "route_loss": tc.route_loss,
            "drop": tc.drop, "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail),
            "frozen_hash": after, "samples": {n: len(samples[n]) for n in names}}


@torch.no_grad()
def centroid_router(model: FlexOlmo, samples: dict[str, torch.Tensor], device: torch.device,
                    batch_size: int = 16) -> dict:
    """Set every layer's router to the nearest-centroid (shared isotropic variance) classifier of its input:
    logit_e(h) = (mu_e . h - |mu_e|^2 / 2) / var, with mu_e the mean router input on expert e's sample. Layer by
    layer, so each layer's inputs come from the layers already set. Biases are relative to the public expert and
    capped at 0 (the bias is < 0 by construction); how many were capped is returned."""
    names = check_samples(model, samples)
    if model.blocks[0].ffn.bias_raw is None:
        raise ValueError("the centroid router needs a model with an expert bias (merge with expert_bias=True)")
    model.to(device).eval()
    d = model.cfg.d_model
    capped = 0
    for i, block in enumerate(model.blocks):
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        current = []
        hook = block.ffn.register_forward_pre_hook(lambda _m, args: current.append(args[0].reshape(-1, d).double()))
        try:
            for n in names:
                for b0 in range(0, len(samples[n]), batch_size):
                    current.clear()
                    model(samples[n][b0 : b0 + batch_size, :-1].to(device))
                    feats[n].append(current[0])
        finally:
            hook.remove()
        h = {n: torch.cat(v) for n, v in feats.items()}
        mu = {n: v.mean(0) for n, v in h.items()}
        var = sum(((v - mu[n]) ** 2).sum() for n, v in h.items()) / (d * sum(len(v) for v in h.values()))
        rows = torch.stack([mu[n] / var for n in names])
        const = torch.stack([-(mu[n] @ mu[n]) / (2 * var) for n in names])
        bias = const[1:] - const[0]
        capped += int((bias > -BIAS_FLOOR).sum())
        ffn = block.ffn
        ffn.router.public.copy_(rows[:1].to(ffn.router.public.dtype))
        ffn.router.experts.copy_(rows[1:].to(ffn.router.experts.dtype))
        ffn.bias_raw.copy_(bias_to_raw(bias.clamp(max=-BIAS_FLOOR)).to(ffn.bias_raw.dtype))
    return {"layers": model.cfg.n_layers, "biases_capped": capped}
