"""Model presets live in conf/model/*.yaml (one source for hydra and for plain-Python users such as benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from flexmore.model.config import ModelConfig


def conf_dir() -> Path:
    """The repository's conf/ folder, or $FLEXMORE_CONF_DIR."""
    env = os.environ.get("FLEXMORE_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"config folder {path} has no config.yaml; run from a clone installed with `pip install -e .`, "
            "or set FLEXMORE_CONF_DIR to the repository's conf/ folder"
        )
    return path


def preset_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def load_preset(name: str, **overrides) -> ModelConfig:
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(preset_names())}")
    fields = yaml.safe_load(path.read_text()) or {}
    fields.update(overrides)
    return ModelConfig(**fields)
