"""Re-fitting a compressed expert's router row on its owner's sample and the public data.

A router row is trained beside the full expert, and later layers' rows read what earlier layers' expert outputs wrote.
A truncated expert writes something else, so at middle ranks the next layer's row sends public tokens to it (measured at
`tiny-long`: 0.77-0.94 of their weight against 0.06 for the full expert), and the public loss rises far above either the
rank-1 or the full expert's (benchmarks/HISTORY.md, sixteenth session). The owner, who has its data and the public data,
re-fits only its row and bias against the compressed expert: no data is shared and the public row, which every artifact
of a merge must share, is kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from flexmore.experts.artifact import ExpertManifest, expert_tensors, load_artifact, save_artifact
from flexmore.experts.merge import merge
from flexmore.experts.router import TuneConfig, tune_router

ROUTER_KEYS = (".router", ".bias")  # layers.{i}.router, layers.{i}.bias: what a refit may change
# The default of flexmore-lowrank and flexmore-sweep: at `small` it kept every rank's public loss within 0.03 of the
# full expert's (0.53-1.47 without) and lowered the expert's own loss (benchmarks/HISTORY.md, seventeenth session).
REFIT_STEPS = 200


def refit_router(base_path: str | Path, artifact: str | Path, own: torch.Tensor, public: torch.Tensor,
                 tc: TuneConfig, device: torch.device,
                 trust_checkpoint: bool = False) -> tuple[dict[str, torch.Tensor], ExpertManifest]:
    """(tensors, manifest) of ``artifact`` with its router row and bias re-fitted (``tune_router`` on the two-expert
    model, every other tensor and the public row kept bit for bit); the manifest's ``training["router_refit"]`` says
    how. ``own`` and ``public``: (n, T + 1) windows of the owner's and the public data."""
    tensors, man = load_artifact(artifact)
    model = merge(base_path, [artifact], trust_checkpoint=trust_checkpoint)
    fit = tune_router(model, {"public": public, model.cfg.expert_names[1]: own},
                      dataclasses.replace(tc, drop=0.0, public_row=False), device, log=None)
    tuned = expert_tensors(model.state_dict(), model.cfg.n_layers, 1)
    out = {k: (tuned[k].to(v.dtype) if k.endswith(ROUTER_KEYS) else v) for k, v in tensors.items()}
    for k, v in out.items():
        if k.endswith(".router_public") and not torch.equal(v, tuned[k].to(v.dtype)):
            raise RuntimeError(f"router refit changed the public row {k}; nothing written")
    record = {k: fit[k] for k in ("steps", "lr", "micro_batch", "route_loss", "loss_first", "loss_last", "samples")}
    return out, dataclasses.replace(man, training={**man.training, "router_refit": record})


def save_refit(base_path: str | Path, artifact: str | Path, out: str | Path, own: torch.Tensor, public: torch.Tensor,
               tc: TuneConfig, device: torch.device, overwrite: bool = False, trust_checkpoint: bool = False) -> Path:
    """``refit_router`` written as the artifact ``out`` (whole or not at all; ``out`` may be ``artifact`` itself with
    ``overwrite``)."""
    tensors, man = refit_router(base_path, artifact, own, public, tc, device, trust_checkpoint)
    return save_artifact(out, tensors, dataclasses.replace(man, name=Path(out).name), overwrite=overwrite)
