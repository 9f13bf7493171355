"""Merge a public base and any number of expert artifacts (full or low-rank, each of its own rank) into one FlexMoRE
model; opt experts out of a merged model without retraining.

Routing of the merged model (FlexOlmo): softmax over all experts' logits (the non-public ones plus their bias b), the
top-k kept without renormalisation. With top-k = all, the output is sum_e p_e(x) * FFN_e(x).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from flexmore.experts.artifact import ExpertManifest, base_hash, load_artifact
from flexmore.model import FlexOlmo, ModelConfig, build_model
from flexmore.model.experts import PROJECTIONS, stored_dense
from flexmore.model.moe import bias_to_raw
from flexmore.store.modeldir import load_model


def _check_ranks(path, manifest: ExpertManifest, tensors: dict, cfg: ModelConfig) -> None:
    """The manifest's ranks (valid: checked when it was read) must be the shapes of the stored factors; storage must
    follow the break-even rule."""
    if manifest.kind != "lowrank":
        return
    ranks = manifest.ranks
    shapes = {"gate_proj": (cfg.d_ffn, cfg.d_model), "up_proj": (cfg.d_ffn, cfg.d_model), "down_proj": (cfg.d_model, cfg.d_ffn)}
    for name, r in zip(PROJECTIONS, ranks):
        out_f, in_f = shapes[name]
        if stored_dense(r, out_f, in_f):
            want = {f"layers.0.{name}.weight": (out_f, in_f)}
        else:
            want = {f"layers.0.{name}.A": (r, in_f), f"layers.0.{name}.B": (out_f, r)}
        for key, shape in want.items():
            got = tuple(tensors[key].shape) if key in tensors else None
            if got != shape:
                raise ValueError(f"expert artifact {path}: rank mismatch for {name} (rank {r}): {key} has shape {got}, "
                                 f"expected {shape} for d_model={cfg.d_model}, d_ffn={cfg.d_ffn}")


def merge(base_path: str | Path, artifact_paths: list[str | Path], top_k: int | None = None,
          expert_bias: bool = True, trust_checkpoint: bool = False) -> FlexOlmo:
    """Base (dense) + artifacts -> one MoE: expert 0 = the public FFN, expert i = artifact i, router rows stacked."""
    if not artifact_paths:
        raise ValueError("merge needs at least one expert artifact")
    base = load_model(base_path, trust_checkpoint=trust_checkpoint)
    bcfg = base.cfg
    if bcfg.num_experts != 1:
        raise ValueError(f"the base {base_path} must be dense (num_experts=1), it has {bcfg.num_experts} experts")
    bhash = base_hash(base.state_dict())
    loaded = [(p, *load_artifact(p)) for p in artifact_paths]
    names = ["public"]
    for path, tensors, man in loaded:
        if man.base_hash != bhash:
            raise ValueError(f"expert artifact {path} ({man.name!r}) was trained against another base "
                             f"(hash {man.base_hash[:12]}..., this base {bhash[:12]}...); merge only experts of one base")
        dims = {k: getattr(bcfg, k) for k in ("d_model", "d_ffn", "n_layers")}
        if any(man.model.get(k) != v for k, v in dims.items()):
            raise ValueError(f"expert artifact {path}: model {man.model} does not match the base's {dims}")
        _check_ranks(path, man, tensors, bcfg)
        if man.name in names:
            raise ValueError(f"expert name {man.name!r} appears twice; names must be unique")
        names.append(man.name)
    E = len(loaded) + 1
    if top_k is not None and not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k}: the merged model has {E} experts (public + {len(loaded)}); allowed 1..{E}")
    pub0 = loaded[0][1]
    for path, tensors, _ in loaded[1:]:
        for i in range(bcfg.n_layers):
            if not torch.equal(tensors[f"layers.{i}.router_public"], pub0[f"layers.{i}.router_public"]):
                raise ValueError(f"expert artifact {path}: its public router row differs from {loaded[0][0]}'s")
    E = len(names)
    cfg = dataclasses.replace(
        bcfg, num_experts=E, top_k=top_k or E, expert_bias=expert_bias, expert_names=names,
        expert_kinds=["full"] + [m.kind for _, _, m in loaded],
        expert_ranks=[[]] + [list(m.ranks) if m.kind == "lowrank" else [] for _, _, m in loaded],
        norm_topk_prob=False,
    )
    model = build_model(cfg, device="cpu")
    sd = model.state_dict()
    sd.update({k: v for k, v in base.state_dict().items()})
    for i in range(bcfg.n_layers):
        pre = f"blocks.{i}.ffn."
        sd[f"{pre}router.public"] = pub0[f"layers.{i}.router_public"][None].clone()
        sd[f"{pre}router.experts"] = torch.stack([t[f"layers.{i}.router"] for _, t, _ in loaded])
        if expert_bias:
            sd[f"{pre}bias_raw"] = bias_to_raw(torch.stack([t[f"layers.{i}.bias"].reshape(()) for _, t, _ in loaded]))
        for e, (_, t, _) in enumerate(loaded, start=1):
            for k, v in t.items():
                if k.startswith(f"layers.{i}.") and k.split(".", 2)[2].split(".")[0] in PROJECTIONS:
                    sd[f"{pre}experts.{e}.{k.split('.', 2)[2]}"] = v
    model.load_state_dict(sd)
    return model


def reroute(model: FlexOlmo, top_k: int | None = None, renormalize: bool | None = None,
            context: str | None = None) -> FlexOlmo:
    """The same merged model with another routing rule (None: keep the model's): each token to its ``top_k`` most
    probable experts, their weights renormalised to sum to 1 or not; or ``context="prefix"`` / ``"sequence"``, the
    public expert and the one its sequence so far prefers, per layer or over all layers (ModelConfig.route_context).
    With renormalisation, or by prefix or sequence, an expert a token does not use cannot change it, so opting that
    expert out leaves the token as it was (FlexOlmo's default is every expert, unrenormalised)."""
    cfg = model.cfg
    k = cfg.top_k if top_k is None else top_k
    if not 1 <= k <= cfg.num_experts:
        raise ValueError(f"top_k={k}: the model has {cfg.num_experts} experts; allowed 1..{cfg.num_experts}")
    new_cfg = dataclasses.replace(cfg, top_k=k, norm_topk_prob=cfg.norm_topk_prob if renormalize is None else renormalize,
                                  route_context=cfg.route_context if context is None else context)
    new = build_model(new_cfg, device="cpu")
    new.load_state_dict(model.state_dict())
    return new


def opt_out(model: FlexOlmo, drop: list[str]) -> FlexOlmo:
    """The merged model without the named experts (their FFNs, router rows and biases); no retraining."""
    cfg = model.cfg
    names = cfg.expert_names or [f"expert{e}" for e in range(cfg.num_experts)]
    unknown = [n for n in drop if n not in names]
    if unknown:
        raise ValueError(f"cannot opt out {unknown}: no such expert; experts are {names}")
    if names[0] in drop:
        raise ValueError(f"the public expert {names[0]!r} cannot be opted out")
    keep = [e for e, n in enumerate(names) if n not in drop]
    E = len(keep)
    new_cfg = dataclasses.replace(
        cfg, num_experts=E, top_k=min(cfg.top_k, E), expert_names=[names[e] for e in keep],
        expert_kinds=[cfg.expert_kind(e) for e in keep] if cfg.expert_kinds else [],
        expert_ranks=[cfg.expert_rank(e) for e in keep] if cfg.expert_kinds else [],
        expert_bias=cfg.expert_bias and E > 1,
    )
    new = build_model(new_cfg, device="cpu")
    old_sd, sd = model.state_dict(), new.state_dict()
    for k in sd:
        if ".ffn." not in k or ".ffn.experts.0." in k or k.endswith("router.public"):
            sd[k] = old_sd[k]
    for i in range(cfg.n_layers):
        pre = f"blocks.{i}.ffn."
        for new_e, old_e in enumerate(keep[1:], start=1):
            sd[f"{pre}router.experts"][new_e - 1] = old_sd[f"{pre}router.experts"][old_e - 1]
            if new_cfg.expert_bias:
                sd[f"{pre}bias_raw"][new_e - 1] = old_sd[f"{pre}bias_raw"][old_e - 1]
            for k in old_sd:
                if k.startswith(f"{pre}experts.{old_e}."):
                    sd[f"{pre}experts.{new_e}." + k[len(f"{pre}experts.{old_e}."):]] = old_sd[k]
    new.load_state_dict(sd)
    return new
