"""Expert artifacts: one folder per expert holding only the expert's own tensors (safetensors) and a JSON manifest.

Tensors, per layer i: the expert FFN's parameters under ``layers.{i}.`` (``gate_proj.weight`` ... for full experts,
``gate_proj.A`` / ``gate_proj.B`` for low-rank projections, ``gate_proj.weight`` for a low-rank expert's projections
stored dense past break-even), ``layers.{i}.router`` (its router row), ``layers.{i}.bias`` (its logit bias) and
``layers.{i}.router_public`` (the frozen public row it was trained against). The bias is b itself (< 0; 0 for an
expert trained without one), not the model's raw parameter. The manifest names the expert, its kind
and ranks, and the content hash of the frozen base every contributor must share.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmore.atomic import atomic_dir
from flexmore.model.experts import Ranks
from flexmore.model.moe import raw_to_bias

MANIFEST, TENSORS = "manifest.json", "expert.safetensors"
FORMAT = "flexmore-expert"
REQUIRED = ("format", "version", "name", "domain", "kind", "ranks", "base_hash", "model", "params")
KINDS = ("full", "lowrank")


@dataclass
class ExpertManifest:
    """``manifest.json`` of an expert artifact: what the expert is and what it was trained against. Read and written
    here only; validated when made, so a bad manifest fails where it enters (naming the artifact when read)."""

    name: str
    domain: str  # its data: embedded domains or shard folders, comma-separated
    kind: str  # full | lowrank
    ranks: list[int] | None  # (gate, up, down) of a low-rank expert; None for a full one
    base_hash: str  # sha256 of the frozen base every contributor must share (``base_hash``)
    model: dict  # d_model, d_ffn, n_layers, vocab_size of the base
    params: int  # the expert's own parameters (router row and bias included)
    dense_projections: list[str] = field(default_factory=list)  # low-rank projections stored dense (past break-even)
    base: str | None = None  # where its base was read from
    steps: int | None = None
    training: dict = field(default_factory=dict)  # the recipe it was trained with
    energy: float | None = None  # extracted: the mean retained SVD energy
    extracted_from: str | None = None  # extracted: the full expert's name
    imported_from: str | None = None  # split from a transformers FlexOlmo folder

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.kind == "lowrank":
            if not isinstance(self.ranks, list) or len(self.ranks) != 3:
                raise ValueError(f"ranks={self.ranks}; need three ranks >= 1 (gate, up, down)")
            try:
                Ranks.of(self.ranks)
            except ValueError:
                raise ValueError(f"ranks={self.ranks}; need three ranks >= 1 (gate, up, down)") from None

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": 1, **{k: v for k, v in asdict(self).items() if v is not None or k == "ranks"}}

    @classmethod
    def from_json(cls, d: dict) -> ExpertManifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def base_hash(base_state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and fp32 bytes of the base (dense) model's tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(base_state):
        h.update(name.encode())
        h.update(base_state[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def expert_tensors(state: dict[str, torch.Tensor], n_layers: int, e: int) -> dict[str, torch.Tensor]:
    """Expert e's own tensors from a full model state dict (any number of experts)."""
    out = {}
    for i in range(n_layers):
        pre = f"blocks.{i}.ffn."
        for k, v in state.items():
            if k.startswith(f"{pre}experts.{e}."):
                out[f"layers.{i}.{k[len(pre) + len(f'experts.{e}.'):]}"] = v
        out[f"layers.{i}.router"] = state[f"{pre}router.experts"][e - 1]
        out[f"layers.{i}.router_public"] = state[f"{pre}router.public"][0]
        raw = state.get(f"{pre}bias_raw")
        out[f"layers.{i}.bias"] = raw_to_bias(raw[e - 1].float()) if raw is not None else torch.zeros(())
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def save_artifact(out: str | Path, tensors: dict[str, torch.Tensor], manifest: ExpertManifest,
                  overwrite: bool = False) -> Path:
    def write(tmp: Path) -> None:
        save_file(tensors, tmp / TENSORS)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1))

    return atomic_dir(Path(out), write, overwrite)


def read_manifest(path: str | Path) -> ExpertManifest:
    """An artifact's manifest alone (no tensors read), checked, naming the artifact when it is not one."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not an expert artifact (needs {MANIFEST} and {TENSORS})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"expert artifact {path}: corrupt {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"expert artifact {path}: {MANIFEST} is not a {FORMAT} manifest")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"expert artifact {path}: corrupt {MANIFEST}, missing {missing}")
    try:
        return ExpertManifest.from_json(manifest)
    except (TypeError, ValueError) as e:
        raise ValueError(f"expert artifact {path}: {e}") from None


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], ExpertManifest]:
    man = read_manifest(path)
    try:
        return load_file(Path(path) / TENSORS), man
    except Exception as e:  # safetensors raises its own SafetensorError (truncated file, bad header), or OSError
        raise ValueError(f"expert artifact {path} ({man.name!r}): {TENSORS} cannot be read ({e}); it is damaged or "
                         "incomplete: copy it again from its owner") from None
