"""Source code: the Python standard library's own .py files, found at run time (no download).

The files are split into train and val by a hash of their relative path, so no file is in both. The content depends
on the Python version that runs it; the split and order do not depend on the seed's machine.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path
from typing import Iterator

from flexmore.data.domains.streams import split_seed

SALT = 2
SKIP = ("site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3/tests")
MAX_FILE_BYTES = 200_000


def source_files(split: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(s in rel for s in SKIP):
            continue
        is_val = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0
        if is_val == (split == "val"):
            files.append(path)
    if not files:
        raise RuntimeError(f"no Python standard library sources found under {root} for the embedded code domain")
    return files


def documents(split: str, seed: int) -> Iterator[str]:
    """Each file once, in a seed-shuffled order; ends when the files run out."""
    files = source_files(split)
    random.Random(split_seed(seed, split, SALT)).shuffle(files)
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 0 < len(text) <= MAX_FILE_BYTES:
            yield f"# file: {path.relative_to(root).as_posix()}\n{text}"
