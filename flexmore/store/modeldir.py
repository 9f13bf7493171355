"""Model folders: config.json (our ModelConfig) + model.safetensors, written atomically; and reading a dense or MoE
model from such a folder, or, for one's own runs only, from a training checkpoint (DCP) folder.

A model folder is what crosses between owners (a public base, a merged model): safetensors and JSON, which cannot run
code when read. A DCP checkpoint's ``.metadata`` is a pickle, so it is read only when the caller says it trusts it
(its own run). A finished training run writes its model folder at ``<run dir>/model``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmore.atomic import atomic_dir
from flexmore.model import FlexOlmo, ModelConfig, build_model
from flexmore.model.moe import bias_to_raw
from flexmore.store.checkpoint import META, CheckpointManager

CONFIG, WEIGHTS = "config.json", "model.safetensors"
MODEL_DIR = "model"  # a finished run's model folder, inside its run folder


class UntrustedCheckpoint(ValueError):
    pass


def save_model_dir(model: FlexOlmo, out: str | Path, overwrite: bool = False, extra: dict | None = None,
                   state: dict[str, torch.Tensor] | None = None, trained_from: str | Path | None = None) -> Path:
    """``extra``: JSON-able provenance kept in config.json beside the model config (e.g. how its router was fitted).
    ``state``: the full state dict when ``model`` holds only shards (gathered by the caller). ``trained_from``: the
    model folder or checkpoint whose recorded training (``trained_info``) this one carries over."""
    trained = trained_info(trained_from) if trained_from is not None else {}
    extra = {**(extra or {}), **({"trained": trained} if trained else {})}

    def write(tmp: Path) -> None:
        sd = {k: v.detach().cpu().contiguous() for k, v in (state or model.state_dict()).items()}
        save_file(sd, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps({"model": dataclasses.asdict(model.cfg), **extra}, indent=1))

    return atomic_dir(Path(out), write, overwrite)


def is_checkpoint(path: Path) -> bool:
    return not (path / CONFIG).is_file() and (path / META).is_file()


def check_trusted(path: str | Path, trust_checkpoint: bool, flag: str = "--trust-checkpoint") -> Path:
    """The model folder or checkpoint that ``path`` names; a checkpoint only when trusted (refused early, with what
    to do, otherwise)."""
    path = latest_checkpoint(path)
    if is_checkpoint(path) and not trust_checkpoint:
        raise UntrustedCheckpoint(
            f"{path} is a training checkpoint (DCP): its .metadata is a pickle, and loading it runs whatever code its "
            "writer put there, so a model from another party must come as a model folder (config.json + "
            "model.safetensors; a finished run writes one at <run dir>/model). For a checkpoint of your own run, "
            f"convert it (flexmore-convert --checkpoint {path} --out FOLDER) or pass {flag}")
    return path


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if (path / CONFIG).is_file():
        return ModelConfig(**json.loads((path / CONFIG).read_text())["model"])
    if (path / META).is_file():  # a training checkpoint
        meta = CheckpointManager.read_meta(path)
        return ModelConfig(name=meta.get("model_name", "checkpoint"), **meta["model"])
    raise FileNotFoundError(f"{path} is neither a model folder ({CONFIG} + {WEIGHTS}) nor a training checkpoint "
                            "(meta.json); for a run folder, name one of its checkpoints/step_* folders")


def trained_info(path: str | Path) -> dict:
    """How the model at ``path`` (a model folder, checkpoint or run folder) was trained, as recorded: {"seq_len": n}
    (the length it was trained at), or {} where nothing was recorded."""
    try:
        path = latest_checkpoint(path)
    except FileNotFoundError:
        return {}
    if (path / CONFIG).is_file():
        return dict(json.loads((path / CONFIG).read_text()).get("trained", {}))
    seq_len = CheckpointManager.read_meta(path).get("seq_len") if (path / META).is_file() else None
    return {"seq_len": seq_len} if seq_len else {}


def load_model(path: str | Path, device: str | torch.device = "cpu", trust_checkpoint: bool = False) -> FlexOlmo:
    """A model from a model folder, or a run folder (its model folder, else its latest checkpoint); a training
    checkpoint only with ``trust_checkpoint`` (its metadata is unpickled)."""
    path = check_trusted(path, trust_checkpoint)
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
    """A model or checkpoint folder as given; for a run folder its model folder (written when it finished), else the
    latest checkpoint in it or in its checkpoints folder."""
    path = Path(path)
    if (path / META).is_file() or (path / CONFIG).is_file():
        return path
    if (path / MODEL_DIR / CONFIG).is_file():
        return path / MODEL_DIR
    for d in (path / "checkpoints", path):
        latest = CheckpointManager(d).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no model or checkpoint found at {path}")
