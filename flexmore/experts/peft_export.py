"""A low-rank expert as a PEFT LoRA adapter on the dense public model (transformers' OLMo2 module names).

The adapter turns the public model's FFN into the expert's (W_public + B A per projection; no routing): useful to
serve or inspect one expert with tools that speak PEFT. Per-projection ranks go to ``rank_pattern`` and lora_alpha
equals each rank, so PEFT's scaling alpha / r is 1 and the delta is exactly B A.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from flexmore.atomic import atomic_dir
from flexmore.experts.artifact import load_artifact
from flexmore.model.experts import PROJECTIONS


def export_peft(artifact: str | Path, out: str | Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> Path:
    tensors, man = load_artifact(artifact)
    if man.kind != "lowrank":
        raise ValueError(f"{artifact} is a {man.kind} expert; only low-rank experts export as LoRA adapters")
    dense = man.dense_projections or []
    if dense:
        raise ValueError(f"{artifact}: projections {dense} are stored dense (rank past break-even); LoRA cannot hold them")
    ranks = dict(zip(PROJECTIONS, man.ranks))
    weights = {}
    for i in range(man.model["n_layers"]):
        for proj in PROJECTIONS:
            pre = f"base_model.model.model.layers.{i}.mlp.{proj}"
            weights[f"{pre}.lora_A.weight"] = tensors[f"layers.{i}.{proj}.A"].contiguous()
            weights[f"{pre}.lora_B.weight"] = tensors[f"layers.{i}.{proj}.B"].contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": max(ranks.values()), "lora_alpha": max(ranks.values()),
        "rank_pattern": ranks, "alpha_pattern": ranks, "target_modules": list(PROJECTIONS), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": base_model_name_or_path or man.base,
        "inference_mode": True,
    }

    def write(tmp: Path) -> None:
        save_file(weights, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))

    return atomic_dir(Path(out), write, overwrite)
