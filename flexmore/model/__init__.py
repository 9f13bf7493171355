"""The FlexOlmo model family: dense OLMo2 decoders and their mixture-of-experts upcycles."""

from flexmore.model.config import ModelConfig
from flexmore.model.experts import DenseSwiGLU, Expert, build_expert
from flexmore.model.moe import MoEFFN
from flexmore.model.params import ParamCounts, count_params, flops_per_token
from flexmore.model.presets import load_preset
from flexmore.model.transformer import FlexOlmo, ModelOutput, build_model

__all__ = [
    "ModelConfig", "Expert", "DenseSwiGLU", "build_expert", "MoEFFN", "ParamCounts", "count_params",
    "flops_per_token", "load_preset", "FlexOlmo", "ModelOutput", "build_model",
]
