"""transformers' FlexOlmo format: import (per-expert 4.57 keys or the fused 5.x layout), split into a public base and
one artifact per expert, and export a merged model (low-rank experts materialised dense: the HF class has none); and
a dense model (the public base) as transformers' OLMo 2, the model PEFT adapters of low-rank experts apply to.

Needs no transformers: the format is config.json + safetensors, read and written here directly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmore.atomic import atomic_dir
from flexmore.experts.artifact import ExpertManifest, base_hash, expert_tensors, save_artifact
from flexmore.experts.merge import opt_out
from flexmore.model import FlexOlmo, ModelConfig, build_model
from flexmore.model.experts import PROJECTIONS
from flexmore.store.modeldir import save_model_dir

SHARED = {  # ours <- theirs, per layer
    "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffn_norm.weight": "post_feedforward_layernorm.weight",
}


def _read_hf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    hf_cfg = json.loads((path / "config.json").read_text())
    if hf_cfg.get("model_type") != "flex_olmo":
        raise ValueError(f"{path}: model_type={hf_cfg.get('model_type')!r}; expected 'flex_olmo'")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return hf_cfg, state


def config_from_hf(hf: dict, name: str = "flexolmo") -> ModelConfig:
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 500_000.0)
    E = hf.get("num_experts", 1)
    return ModelConfig(
        name=name, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), d_ffn=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        num_experts=E, top_k=hf.get("num_experts_per_tok", E), norm_topk_prob=hf.get("norm_topk_prob", False),
    )


def import_hf(path: str | Path) -> FlexOlmo:
    """Our model with the weights of an HF FlexOlmo folder (either expert key layout)."""
    path = Path(path)
    hf_cfg, st = _read_hf(path)
    cfg = config_from_hf(hf_cfg)
    model = build_model(cfg, device="cpu")
    sd = {"embed.weight": st["model.embed_tokens.weight"], "norm.weight": st["model.norm.weight"],
          "lm_head.weight": st.get("lm_head.weight", st["model.embed_tokens.weight"])}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for ours, theirs in SHARED.items():
            sd[f"blocks.{i}.{ours}"] = st[p + theirs]
        fused = p + "mlp.experts.gate_up_proj"
        for e in range(cfg.num_experts):
            q = f"blocks.{i}.ffn.experts.{e}."
            if fused in st:
                gate, up = st[fused][e].chunk(2, dim=0)
                sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"] = gate, up
                sd[q + "down_proj.weight"] = st[p + "mlp.experts.down_proj"][e]
            else:
                for proj in PROJECTIONS:
                    sd[q + f"{proj}.weight"] = st[p + f"mlp.experts.{e}.{proj}.weight"]
        if cfg.num_experts > 1:
            gate = st[p + "mlp.gate.weight"]
            sd[f"blocks.{i}.ffn.router.public"], sd[f"blocks.{i}.ffn.router.experts"] = gate[:1], gate[1:]
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if "bias_raw" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def split_hf(path: str | Path, out: str | Path, names: list[str] | None = None) -> tuple[Path, list[Path]]:
    """An HF FlexOlmo -> ``out/base`` (the dense public model) + ``out/experts/<name>`` (one full artifact each)."""
    model = import_hf(path)
    cfg = model.cfg
    names = names or [f"expert{e}" for e in range(1, cfg.num_experts)]
    if len(names) != cfg.num_experts - 1:
        raise ValueError(f"{len(names)} names for {cfg.num_experts - 1} non-public experts")
    model.cfg = dataclasses.replace(cfg, expert_names=["public", *names])
    dense = opt_out(model, names)  # every non-public expert dropped: the base
    base_dir = save_model_dir(dense, Path(out) / "base")
    bhash = base_hash(dense.state_dict())
    state = model.state_dict()
    arts = []
    for e, name in enumerate(names, start=1):
        tensors = expert_tensors(state, cfg.n_layers, e)  # no bias in the HF class: b = 0
        arts.append(save_artifact(Path(out) / "experts" / name, tensors, ExpertManifest(
            name=name, domain=name, kind="full", ranks=None, base_hash=bhash, base=str(base_dir),
            model={k: getattr(cfg, k) for k in ("d_model", "d_ffn", "n_layers", "vocab_size")},
            params=sum(v.numel() for k, v in tensors.items() if not k.endswith("router_public")),
            imported_from=str(path))))
    return base_dir, arts


BIAS_EXPORT = ("error", "drop")


def export_hf(model: FlexOlmo, out: str | Path, layout: str = "fused", overwrite: bool = False,
              bias: str = "error") -> Path:
    """Write transformers' FlexOlmo folder. Low-rank experts are materialised (W_public + B A). The HF class has no
    expert bias and a constant cannot be folded into a bias-free router row, so a model with a bias (|b| > 1e-6) is
    refused (``bias="error"``) rather than silently changed; ``bias="drop"`` writes it without the bias: the same
    model with ``expert_bias=False``, whose routing differs (evaluate it before shipping it)."""
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout={layout!r}; allowed: fused (transformers 5.x), per_expert (4.57)")
    if bias not in BIAS_EXPORT:
        raise ValueError(f"bias={bias!r}; allowed: {', '.join(BIAS_EXPORT)}")
    cfg = model.cfg
    if cfg.route_context != "token":
        raise ValueError(f"route_context={cfg.route_context!r}: transformers' FlexOlmo routes each token by itself; "
                         "export the model with route_context='token' (merge.reroute(model, context='token'))")
    sd = model.state_dict()
    for i, block in enumerate(model.blocks):
        b = block.ffn.expert_bias()
        if bias == "error" and b is not None and (b.abs() > 1e-6).any():
            raise ValueError(f"layer {i} has a learned expert bias ({[round(v, 4) for v in b.tolist()]}); transformers' "
                             "FlexOlmo has none: export with bias='drop' (flexmore-merge --hf-bias drop) to write the "
                             "model without it")
    st = _hf_shared_state(sd, cfg.n_layers)
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        weights = []
        with torch.no_grad():
            for e, ex in enumerate(block.ffn.experts):
                pub = block.ffn.experts[0]
                w = {}
                for proj in PROJECTIONS:
                    w[proj] = getattr(ex, proj).weight if ex.kind == "full" else getattr(pub, proj).weight + ex.delta(proj)
                weights.append(w)
        if layout == "fused":
            st[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"], w["up_proj"]]) for w in weights])
            st[p + "mlp.experts.down_proj"] = torch.stack([w["down_proj"] for w in weights])
        else:
            for e, w in enumerate(weights):
                for proj in PROJECTIONS:
                    st[p + f"mlp.experts.{e}.{proj}.weight"] = w[proj]
        st[p + "mlp.gate.weight"] = block.ffn.router.weight if block.ffn.router is not None else torch.zeros(1, cfg.d_model)
    hf_cfg = {"architectures": ["FlexOlmoForCausalLM"], "model_type": "flex_olmo", **_hf_config(cfg),
              "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.norm_topk_prob}

    return _write_hf(out, st, hf_cfg, overwrite)


def export_olmo2(model: FlexOlmo, out: str | Path, overwrite: bool = False) -> Path:
    """Write a dense model (one expert, no router: a public base) as transformers' ``Olmo2ForCausalLM`` folder, the
    layout OLMo 2 checkpoints and PEFT adapters on them use (``model.layers.N.mlp.{gate,up,down}_proj``)."""
    cfg = model.cfg
    if cfg.num_experts != 1:
        raise ValueError(f"export_olmo2 writes dense models; this one has {cfg.num_experts} experts "
                         f"{cfg.expert_names}: export it as FlexOlmo (export_hf, flexmore-merge --hf) or opt the "
                         "others out first")
    sd = model.state_dict()
    st = _hf_shared_state(sd, cfg.n_layers)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for proj in PROJECTIONS:
            st[p + f"mlp.{proj}.weight"] = sd[f"blocks.{i}.ffn.experts.0.{proj}.weight"]
    return _write_hf(out, st, {**_hf_config(cfg), "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2"},
                     overwrite)


def _hf_shared_state(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Our state under transformers' names for what OLMo 2 and FlexOlmo share: embedding, norms, attention, head."""
    st = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["lm_head.weight"]}
    for i in range(n_layers):
        for ours, theirs in SHARED.items():
            st[f"model.layers.{i}.{theirs}"] = sd[f"blocks.{i}.{ours}"]
    return st


def _hf_config(cfg: ModelConfig) -> dict:
    """The fields transformers' OLMo 2 and FlexOlmo configs share."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ffn,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }


def _write_hf(out: str | Path, st: dict[str, torch.Tensor], hf_cfg: dict, overwrite: bool) -> Path:
    def write(tmp: Path) -> None:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in st.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=1))

    return atomic_dir(Path(out), write, overwrite)
