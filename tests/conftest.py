"""Shared fixtures: one generated-corpus cache per test session, single-threaded torch, tiny configs, and the naive
orthogonal step that the optimizer and kernel tests check against."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

torch.set_num_threads(1)
# Without a GPU the Triton kernels run in the interpreter; it must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    """Every test shares one cache of generated embedded shards (and never touches ~/.cache)."""
    path = tmp_path_factory.mktemp("flexmore-cache")
    os.environ["FLEXMORE_CACHE"] = str(path)
    os.environ.setdefault("WANDB_MODE", "disabled")
    return path


def naive_orthogonal(d: torch.Tensor) -> torch.Tensor:
    """The orthogonal step the long way: five quintic Newton-Schulz steps on the wide orientation, in float64, times
    0.2 sqrt(max side)."""
    x = d.double().T if d.shape[0] > d.shape[1] else d.double()
    x = x / (math.sqrt(float((x * x).sum())) + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x - 4.7750 * (a @ x) + 2.0315 * (a @ a @ x)
    x = x.T if d.shape[0] > d.shape[1] else x
    return x * 0.2 * math.sqrt(max(d.shape))


def tiny_config(tmp_path, **sections):
    """A Config for a few-second CPU run; ``sections`` maps a section name to field overrides."""
    from flexmore.config import (
        Config,
        DataConfig,
        DeMoConfig,
        LoggingConfig,
        OptimConfig,
        TrainConfig,
    )
    from flexmore.model.presets import load_preset

    model = load_preset("tiny", **sections.pop("model", {}))
    data = DataConfig(**{"train_chars": 100_000, "val_chars": 10_000, "val_domains": ["public", "math"],
                         **sections.pop("data", {})})
    train = TrainConfig(**{"steps": 12, "seq_len": 32, "micro_batch": 4, "log_every": 1, "eval_every": 6,
                           "eval_batches": 1, "progress": False, **sections.pop("train", {})})
    optim = dict(sections.pop("optim", {}))  # DeMo's settings may be given flat: {"name": "demo", "topk": 8}
    demo = {k: optim.pop(k) for k in list(optim) if k in {f.name for f in dataclasses.fields(DeMoConfig)}
            and k != "weight_decay"}
    optim = OptimConfig(**{"warmup_steps": 2, **optim, "demo": DeMoConfig(**demo)})
    cfg = Config(model=model, data=data, train=train, optim=optim, logging=LoggingConfig(mode="disabled"),
                 run_dir=str(tmp_path / "run"), **sections)
    return cfg


def replace_section(cfg, section: str, **fields):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
