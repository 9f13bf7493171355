"""Model folders: config.json (our ModelConfig) + model.safetensors, written atomically; and reading a dense or MoE
model from either such a folder or a training checkpoint (DCP) folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmore.atomic import atomic_dir
from flexmore.model import FlexOlmo, ModelConfig, build_model
from flexmore.model.moe import bias_to_raw
from flexmore.store.checkpoint import CheckpointManager

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def save_model_dir(model: FlexOlmo, out: str | Path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """``extra``: JSON-able provenance kept in config.json beside the model config (e.g. how its router was fitted)."""
    def write(tmp: Path) -> None:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps({"model": dataclasses.asdict(model.cfg), **(extra or {})}, indent=1))

    return atomic_dir(Path(out), write, overwrite)


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if (path / CONFIG).is_file():
        return ModelConfig(**json.loads((path / CONFIG).read_text())["model"])
    if (path / "meta.json").is_file():  # a training checkpoint
        meta = json.loads((path / "meta.json").read_text())
        return ModelConfig(name=meta.get("model_name", "checkpoint"), **meta["model"])
    raise FileNotFoundError(f"{path} is neither a model folder ({CONFIG} + {WEIGHTS}) nor a training checkpoint "
                            "(meta.json); for a run folder, name one of its checkpoints/step_* folders")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> FlexOlmo:
    """A model from a model folder, a training checkpoint, or a run folder (its latest checkpoint); weights only,
    never unpickled."""
    path = latest_checkpoint(path)
    cfg = read_config(path)
    model = build_model(cfg, device=device)
    if (path / WEIGHTS).is_file():
        model.load_state_dict(upgrade_state(load_file(path / WEIGHTS, device=str(device))))
    else:
        CheckpointManager.load(path, model, None)
    return model


def upgrade_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Folders written before the bias became b = -softplus(raw) hold ``expert_bias`` (used as min(b, 0))."""
    for key in [k for k in sd if k.endswith(".ffn.expert_bias")]:
        sd[key[: -len("expert_bias")] + "bias_raw"] = bias_to_raw(sd.pop(key).clamp(max=0))
    return sd


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest one in a run folder / checkpoints folder."""
    path = Path(path)
    if (path / "meta.json").is_file() or (path / CONFIG).is_file():
        return path
    for d in (path / "checkpoints", path):
        latest = CheckpointManager(d).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no model or checkpoint found at {path}")
