"""Checkpoints with torch.distributed.checkpoint: atomic (temp folder renamed into place), keep-last-K, shape-checked.

Layout: <save_dir>/step_00000100/{DCP files, meta.json}. A folder whose name is step_<N> is complete by construction:
it only gets that name by a rename after everything in it was written, so a crash mid-save leaves a hidden
``.step_<N>.tmp`` folder that is never taken as the latest and is cleaned up by the next save. meta.json holds the
sha256 of every file, checked before a resume: a damaged checkpoint is named and the one before it used.

DCP's ``.metadata`` is a pickle, so loading a checkpoint runs whatever its writer put there: checkpoints are for
resuming one's own run. Models that cross between owners are model folders (safetensors + JSON, store/modeldir.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from flexdemo import FlexDeMo
from flexmore.atomic import publish, temp_dir_for
from flexmore.distributed import barrier, rank
from flexmore.model.config import ModelConfig
from flexmore.parallel.mesh import ParallelContext
from flexmore.parallel.strategy import Strategy
from flexmore.store.demo_state import residual_state

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process save/load that it assumes a single process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext | None) -> dict:
    """AdamW's state through DCP's optimizer helpers; FlexDeMo's per-replica residuals stacked over replicas."""
    if isinstance(optimizer, FlexDeMo):
        if ctx is None:
            raise ValueError("saving FlexDeMo state needs the ParallelContext (its replicas' residuals differ)")
        return {"demo": residual_state(optimizer, model, ctx)}
    return {"optim": get_optimizer_state_dict(model, optimizer)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class CheckpointManager:
    def __init__(self, save_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        self.dir, self.keep_last = Path(save_dir), keep_last

    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := STEP_DIR.match(p.name)) and (p / META).is_file())

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def latest_intact(self, log=print) -> Path | None:
        """The newest checkpoint whose files match the checksums it was saved with; each damaged one is named."""
        damaged = []
        for step in reversed(self.steps()):
            problem = self.damage(self.path(step))
            if problem is None:
                return self.path(step)
            damaged.append(self.path(step))
            log(f"checkpoint {self.path(step)} is damaged ({problem}); trying the one before it")
        if damaged:
            raise ValueError(f"every checkpoint in {self.dir} is damaged ({', '.join(map(str, damaged))}); move them "
                             "aside to start over")
        return None

    @classmethod
    def damage(cls, path: Path) -> str | None:
        """What is wrong with a checkpoint's files (None: they match their checksums, or it predates them)."""
        try:
            meta = cls.read_meta(path)
        except (ValueError, OSError) as e:
            return f"{META} unreadable: {e}"
        for name, digest in meta.get("files", {}).items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if file_sha256(path / name) != digest:
                return f"{name} does not match its checksum"
        return None

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        path = Path(path)
        if not (path / META).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
        try:
            meta = json.loads((path / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / META} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or "model" not in meta or "step" not in meta:
            raise ValueError(f"{path / META} lacks the model shape or the step: not a checkpoint this code wrote")
        return meta

    @classmethod
    def check_compatible(cls, path: str | Path, model_cfg: ModelConfig, strategy: Strategy | None = None,
                         replicate: int | None = None) -> dict:
        """Fail before any work if the checkpoint holds another model shape, another optimizer's state, or another
        number of FlexDeMo replicas' residuals; name what differs."""
        meta = cls.read_meta(path)
        saved, now = meta["model"], model_cfg.shape_dict()
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume from {path}: it holds another model shape ({detail})")
        par = meta.get("parallel", {})
        if strategy is not None and par.get("optimizer", strategy.name) != strategy.name:
            raise ValueError(f"cannot resume from {path}: it holds {par['optimizer']!r} optimizer state, "
                             f"this run uses optim={strategy.name!r}")
        if strategy is not None and strategy.per_replica_state and par.get("replicate", replicate) != replicate:
            raise ValueError(f"cannot resume from {path}: it holds the residual momenta of {par['replicate']} "
                             f"replicas, this run has {replicate} (the shard degree may change, the replicas may not)")
        return meta

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
             ctx: ParallelContext | None = None) -> Path:
        final = self.path(step)
        tmp = temp_dir_for(final, unique=False)  # every rank writes into it
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        state = {"model": get_model_state_dict(model), "rng": _rng_state(), **_optim_state(model, optimizer, ctx)}
        try:
            with _quiet():
                dcp.save(state, checkpoint_id=str(tmp))
        except BaseException as e:
            free = shutil.disk_usage(self.dir).free
            if free < (1 << 26) or "no space" in str(e).lower():  # under 64 MiB left: what a full disk looks like
                latest = self.latest()
                raise OSError(f"saving step {step} failed: the disk holding {self.dir} is full ({free:,} bytes free). "
                              + (f"The last checkpoint, {latest}, is intact" if latest else "No checkpoint was saved")
                              + "; free space and run again to resume") from e
            raise
        barrier()
        if rank() == 0:
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / META).write_text(json.dumps({**meta, "step": step, "files": files}, indent=1))
            publish(tmp, final, overwrite=True)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        for p in self.dir.iterdir():
            if p.name.startswith(".step_") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             ctx: ParallelContext | None = None) -> dict:
        """Restore model, optimizer and RNG in place; return the meta (step, loader position, ...)."""
        meta = CheckpointManager.read_meta(path)
        state = {"model": get_model_state_dict(model), "rng": _rng_state()}
        if optimizer is not None:
            state.update(_optim_state(model, optimizer, ctx))
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        if "optim" in state:
            set_optimizer_state_dict(model, optimizer, state["optim"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        return meta
