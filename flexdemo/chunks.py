"""How a local shard is cut into s x s chunks: real 2-D tiles of the (rows, cols) matrix, zero-padded at ragged edges.

FlexDeMo's anchor used flat 1-D shards, so a shard length with no divisor near 64 got chunk 1 (no compression).
Here a 2-D shard keeps its matrix shape and is padded up to whole tiles: the chunk is always s x s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ChunkLayout:
    rows: int
    cols: int
    s: int

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.rows // self.s), -(-self.cols // self.s)

    @property
    def num_chunks(self) -> int:
        gr, gc = self.grid
        return gr * gc

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, cols) -> (num_chunks, s, s), chunks in row-major grid order."""
        gr, gc = self.grid
        s = self.s
        x = F.pad(x, (0, gc * s - self.cols, 0, gr * s - self.rows))
        return x.view(gr, s, gc, s).permute(0, 2, 1, 3).reshape(gr * gc, s, s)

    def from_chunks(self, c: torch.Tensor) -> torch.Tensor:
        """(num_chunks, s, s) -> (rows, cols), dropping the padding."""
        gr, gc = self.grid
        s = self.s
        x = c.view(gr, gc, s, s).permute(0, 2, 1, 3).reshape(gr * s, gc * s)
        return x[: self.rows, : self.cols]
