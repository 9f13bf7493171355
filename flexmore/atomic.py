"""Write a folder under a hidden temporary name, then rename it into place: a crash never leaves a half-written
folder under the final name. Every folder this project writes (token shards, model folders, expert artifacts,
checkpoints) goes through here."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def temp_dir_for(out: Path, unique: bool = True) -> Path:
    """A hidden sibling of ``out`` (``.name.tmp-xxxx``; ``.name.tmp`` when every rank must agree on it)."""
    out = Path(out)
    return out.parent / (f".{out.name}.tmp-{uuid.uuid4().hex[:8]}" if unique else f".{out.name}.tmp")


def publish(tmp: Path, out: Path, overwrite: bool = False) -> Path:
    """Rename the finished ``tmp`` to ``out``. An existing ``out`` is replaced with ``overwrite``; without it, one
    that another process finished first is kept (the writers are deterministic) and ``tmp`` is dropped."""
    if out.exists() and overwrite:
        shutil.rmtree(out)
    try:
        os.rename(tmp, out)
    except OSError:
        if overwrite or not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def atomic_dir(out: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` then publish tmp_dir as ``out``; on any error nothing appears at ``out``. Without
    ``overwrite``, an ``out`` that another process published meanwhile is kept (concurrent sweep shards)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    tmp.mkdir()
    try:
        write(tmp)
        publish(tmp, out, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
