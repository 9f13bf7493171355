"""The optimizer step's phases replayed as CUDA graphs (``DeMoConfig.cuda_graphs``).

A model of many small tensors makes the step host-bound: its kernels take less GPU time than Python and the launcher
take to queue them (H200 profile of ``base``, benchmarks/HISTORY.md). A captured phase costs one replay. A graph bakes
in every address and every scalar it saw, so the phases read their rates from device memory (``DeviceScalars``) and
their gradients, which a backward allocates anew, from places refreshed before each replay (``FlexDeMo._feed``). A
phase is keyed by what it cannot be fed (the tensors that have gradients and their dtypes, where the parameters and
momenta sit): a key is run eagerly the first time it is seen, captured the second time, replayed after.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

GRAPHS_KEPT = 8  # captured phases kept per optimizer (the oldest key is dropped, with its graph's memory)


class PhaseGraphs:
    """Run ``fn`` eagerly the first time ``key`` is seen, capture it as a CUDA graph the second, replay it after."""

    def __init__(self, capacity: int = GRAPHS_KEPT):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()  # key -> None (seen once) or (graph, output, held)
        self.captures = 0
        self.replays = 0

    def run(self, key, fn: Callable[[], object], hold: Callable[[], object] = lambda: None):
        """``fn``'s output (a captured graph's static output from the second time on). ``hold()``, called after the
        capture, returns what the graph reads but does not own (kept alive as long as the graph)."""
        if key not in self._entries:
            self._entries[key] = None
            self._trim()
            return fn()
        self._entries.move_to_end(key)
        entry = self._entries[key]
        if entry is None:
            try:
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads (a process group's watchdog) may touch CUDA meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    out = fn()
            except Exception as e:  # nothing ran: a capture only records, so the step can be taken again eagerly
                raise RuntimeError(f"capturing the optimizer's {key[0]} phase as a CUDA graph failed ({e}); this "
                                   "step was not taken. Resume with optim.demo.cuda_graphs=false") from e
            entry = self._entries[key] = (graph, out, hold())
            self.captures += 1
        entry[0].replay()
        self.replays += 1
        return entry[1]

    def _trim(self) -> None:
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class DeviceScalars:
    """Named lists of fp32 scalars in device memory, rewritten (stream-ordered, no host wait) before each use: what
    a captured graph reads in place of a Python float that changes from step to step (a scheduled learning rate)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._slots: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, values: list[float]) -> list[torch.Tensor]:
        slot = self._slots.get(name)
        if slot is None or slot.numel() != len(values):
            slot = self._slots[name] = torch.empty(len(values), dtype=torch.float32, device=self.device)
        out = list(slot.unbind())
        for x, v in zip(out, values):
            x.fill_(v)  # a kernel argument: no pageable copy, which would wait for the queued work
        return out
