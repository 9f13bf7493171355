"""Many tensors' chunks as one kernel launch: which tensor each chunk belongs to and where its payload goes.

A model has dozens to hundreds of 2-D tensors, most of them only a few hundred chunks: one launch per tensor is a
partial wave over the GPU and a Python launch each, so the optimizer step becomes launch-bound (benchmarks/HISTORY.md).
One launch over a table of every tensor's chunks fills the GPU and costs one launch. The table's shapes and offsets
are fixed when it is built; the tensors' addresses and row strides are passed per call (gradients are new tensors
every step). Payload places are counted in chunks of k entries: tensor t's payload is entries
``payload_slice(t)`` of the flat payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexdemo.chunks import ChunkLayout

# columns of ChunkTable.meta
ROWS, COLS, GRID_COLS, LAUNCH_FIRST, PAYLOAD_FIRST = range(5)
ADDRESS_TABLES = 8  # address tables kept on the device per ChunkTable (encode's, decode's, ... of the last steps)


@dataclass
class ChunkTable:
    """Tensors t = 0..T-1 with their layouts; launch chunk c belongs to tensor ``tensor_of_chunk[c]``, is its chunk
    ``c - meta[t, LAUNCH_FIRST]`` (row-major over its chunk grid) and writes / reads payload chunk
    ``meta[t, PAYLOAD_FIRST] + that``, k entries per chunk."""

    layouts: list[ChunkLayout]
    payload_first: list[int]  # in chunks
    k: int  # payload entries per chunk
    tensor_of_chunk: torch.Tensor  # (num_chunks,) int32
    meta: torch.Tensor  # (T, 5) int64
    # address rows -> their device copy: a step whose tensors sit where they sat before reuses it (no pinned copy)
    _addresses: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, layouts: list[ChunkLayout], payload_first: list[int], k: int, device: torch.device) -> "ChunkTable":
        if not layouts:
            raise ValueError("a ChunkTable needs at least one tensor")
        if len(layouts) != len(payload_first):
            raise ValueError(f"{len(layouts)} layouts but {len(payload_first)} payload offsets")
        if len({lay.s for lay in layouts}) > 1:
            raise ValueError(f"one chunk size per table; got {sorted({lay.s for lay in layouts})}")
        if not 1 <= k <= layouts[0].s ** 2:
            raise ValueError(f"k={k} must be in [1, s*s={layouts[0].s ** 2}]")
        rows, owner, first = [], [], 0
        for t, (lay, pf) in enumerate(zip(layouts, payload_first)):
            rows.append([lay.rows, lay.cols, lay.grid[1], first, pf])
            owner.append(torch.full((lay.num_chunks,), t, dtype=torch.int32))
            first += lay.num_chunks
        meta = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)
        tensor_of_chunk = torch.cat(owner)
        return cls(list(layouts), list(payload_first), k, tensor_of_chunk.to(device), meta.to(device))

    @property
    def num_chunks(self) -> int:
        return int(self.tensor_of_chunk.numel())

    @property
    def s(self) -> int:
        return self.layouts[0].s

    def payload_slice(self, t: int) -> slice:
        """Tensor t's entries of the flat payload."""
        first = self.payload_first[t]
        return slice(first * self.k, (first + self.layouts[t].num_chunks) * self.k)

    def addresses(self, *tensor_lists: list[torch.Tensor | None]) -> torch.Tensor:
        """(T, 2 * len(tensor_lists)) int64 on the table's device: each list's [address, row stride] per tensor
        (0, 0 for None). Each tensor must be a (rows, cols) view with unit column stride, as the kernels index it,
        or a contiguous tensor of rows * cols elements (taken as its (rows, cols) view: no view to build).
        Momenta and parameters never move and gradients mostly come back where they were, so the device copy of
        rows seen lately is reused: the step's host time went largely into pinning and copying these (H200 profile,
        benchmarks/HISTORY.md)."""
        out = []
        for t, lay in enumerate(self.layouts):
            row = []
            for tensors in tensor_lists:
                x = tensors[t]
                if x is None:
                    row += [0, 0]
                    continue
                if x.dim() != 2 and x.is_contiguous() and x.numel() == lay.rows * lay.cols:
                    row += [x.data_ptr(), lay.cols]
                    continue
                if tuple(x.shape) != (lay.rows, lay.cols) or (lay.cols > 1 and x.stride(1) != 1):
                    raise ValueError(f"tensor {t}: shape {tuple(x.shape)} stride {x.stride()}; the table wants "
                                     f"({lay.rows}, {lay.cols}) with unit column stride, or a contiguous tensor "
                                     f"of {lay.rows * lay.cols} elements")
                row += [x.data_ptr(), x.stride(0)]
            out.append(row)
        key = (len(tensor_lists), *(v for row in out for v in row))
        cached = self._addresses.get(key)
        if cached is not None:  # the same addresses and strides: the same table (it is only ever read)
            return cached[1]
        host = torch.tensor(out, dtype=torch.int64)
        device = self.meta.device
        if device.type == "cuda":  # pinned and asynchronous: no wait for the queued backward pass
            host = host.pin_memory()
            table = host.to(device, non_blocking=True)
        else:
            table = host.to(device)
        if len(self._addresses) >= ADDRESS_TABLES:
            self._addresses.pop(next(iter(self._addresses)))  # the oldest
        self._addresses[key] = (host, table)  # the pinned source lives as long as the copy may be replayed
        return table

    def held_addresses(self) -> list:
        """The address tables cached now, with their pinned sources: a captured CUDA graph that read them holds
        these, so that they outlive the cache."""
        return list(self._addresses.values())
