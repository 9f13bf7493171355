"""An append-only JSONL store of sweep cells: a cell's rows and its done-marker go down in one write, so after a
crash the cells that finished are kept and a half-written one is simply recomputed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def finite(v):
    """NaN and infinities as null, so what is written is valid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.done: set[str] = set()
        if self.path.is_file():
            pending: dict[str, list[dict]] = {}
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a crash
                    continue
                if rec.get("_done"):
                    self.done.add(rec["_cell"])
                    self.rows += pending.pop(rec["_cell"], [])
                else:
                    pending.setdefault(rec.get("_cell"), []).append(rec)

    def add(self, cell: str, rows: list[dict]) -> None:
        rows = [{**r, "_cell": cell} for r in rows]
        text = "".join(json.dumps(r, default=str) + "\n" for r in rows + [{"_cell": cell, "_done": True}])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one write() on an O_APPEND descriptor: concurrent sweep shards never interleave their lines
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = text.encode()
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {self.path} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows += rows
        self.done.add(cell)
