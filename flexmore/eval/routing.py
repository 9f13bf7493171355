"""Routing diagnostics: per evaluation domain and layer, each expert's mean router probability and the fraction of
tokens whose top-k holds it; the domain x expert table and its heat-map; the same as training metrics (moe/*)."""

from __future__ import annotations

from pathlib import Path

import torch

from flexmore.eval.validation import autocast_ctx


def expert_names(cfg) -> list[str]:
    return cfg.expert_names or [f"expert{e}" for e in range(cfg.num_experts)]


@torch.no_grad()
def routing_stats(model, val_sets: dict, device: torch.device, autocast: str = "auto") -> list[dict]:
    """Rows {domain, layer, expert, prob, topk}, token-weighted over each domain's batches; [] for a dense model."""
    cfg = model.cfg
    if cfg.num_experts == 1:
        return []
    names = expert_names(cfg)
    was = model.training
    model.eval()
    rows = []
    for domain, batches in val_sets.items():
        sums = {"prob": 0.0, "topk": 0.0}
        tokens = 0
        for x, _ in batches:
            with autocast_ctx(autocast, device):
                aux = model(x.to(device)).aux
            n = x.numel()
            sums = {k: sums[k] + aux[f"layer_expert_{k}"].double().cpu() * n for k in sums}
            tokens += n
        for layer in range(cfg.n_layers):
            for e, name in enumerate(names):
                rows.append({"domain": domain, "layer": layer, "expert": name,
                             "prob": float(sums["prob"][layer, e] / tokens), "topk": float(sums["topk"][layer, e] / tokens)})
    model.train(was)
    return rows


def routing_metrics(layer_stats: dict[str, torch.Tensor], model_cfg) -> dict[str, float]:
    """moe/<expert>/{prob,topk} (mean over layers) and moe/L<i>/<expert>/{prob,topk}, from (L, E) statistics."""
    out = {}
    names = expert_names(model_cfg)
    for key, short in (("layer_expert_prob", "prob"), ("layer_expert_topk", "topk")):
        if key not in layer_stats:
            continue
        stats = layer_stats[key].float().cpu()
        for e, name in enumerate(names):
            out[f"moe/{name}/{short}"] = stats[:, e].mean().item()
            out.update({f"moe/L{i}/{name}/{short}": stats[i, e].item() for i in range(stats.shape[0])})
    return out


def routing_mass(rows: list[dict], key: str = "prob") -> dict[str, dict[str, float]]:
    """domain -> expert -> the mean over layers of ``key``."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        out.setdefault(r["domain"], {}).setdefault(r["expert"], []).append(r[key])
    return {d: {e: sum(v) / len(v) for e, v in ex.items()} for d, ex in out.items()}


def plot_routing(rows: list[dict], path: str | Path, title: str = "router probability") -> Path:
    """A domain x expert heat-map of the mean router probability over layers, each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = routing_mass(rows)
    domains = list(mass)
    experts = list(next(iter(mass.values())))
    grid = [[mass[d][e] for e in experts] for d in domains]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(experts), 1.0 + 0.6 * len(domains)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(experts)), experts)
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("expert")
    ax.set_ylabel("evaluation domain")
    ax.set_title(f"{title} (mean over layers)")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
