"""What a run adds to plain training, handed to the loop by the entry point. The loop knows no expert: a FlexMoRE
expert run (``flexmore.experts.training.expert_recipe``) is one recipe among any."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from flexmore.data.shards import TokenStream
from flexmore.model import ModelConfig


@dataclass
class Recipe:
    """Hooks, each optional, called once by the loop in this order: ``loader`` (after the data is checked),
    ``init_state`` (only for a fresh start: a full state dict every layout starts from), then ``finish`` (after the
    last step of the schedule: what the run writes, e.g. an artifact)."""

    name: str
    model_config: ModelConfig  # the shape to build (vocab resolved)
    trainable: Callable[[str], bool] | None = None  # parameters it rejects are frozen (no gradient, no state)
    loader: Callable[[TokenStream, int, int], Any] | None = None  # (train stream, dp rank, dp world) -> a loader
    init_state: Callable[[torch.device, TokenStream], dict[str, torch.Tensor]] | None = None
    finish: Callable[[torch.nn.Module, int, Path], Path | None] | None = None  # (model, rank, run dir) -> written
