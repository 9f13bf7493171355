"""A slow link between nodes, emulated on one machine: a collective over the replicate group is made to last as long
as it would over a link of the given bandwidth and latency. Only time changes, never the bits.

A ring collective of R ranks is R - 1 (all-gather) or 2 (R - 1) (all-reduce) messages in a row per rank, each paying
the latency once; the bytes are what one rank sends. The collective runs at full speed, then the rank waits out the
rest of the time the capped link would have taken (a token bucket refilled at the link's rate, drained per
collective), and the achieved bandwidth is recorded so a run can print it beside the setting.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass
class LinkCap:
    gbps: float  # Gbit/s one rank can send
    latency_ms: float = 0.0  # per message
    sent_bytes: float = 0.0
    seconds: float = 0.0
    collectives: int = 0
    _free_at: float = 0.0  # when the collective held last is done with the link

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gbps) and self.gbps > 0):
            raise ValueError(f"link_gbps={self.gbps} must be a finite number of Gbit/s > 0")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"link_latency_ms={self.latency_ms} must be a finite number of milliseconds >= 0")

    def seconds_for(self, nbytes: float, messages: int) -> float:
        """How long sending ``nbytes`` in ``messages`` ring steps takes on this link."""
        return messages * self.latency_ms / 1e3 + nbytes * 8 / (self.gbps * 1e9)

    def hold(self, nbytes: float, messages: int, started: float) -> None:
        """Wait until a collective that began at ``started`` (time.perf_counter) would have finished on this link;
        collectives in flight together share it: one starts sending when the one held before it has finished."""
        end = max(started, self._free_at) + self.seconds_for(nbytes, messages)
        self._free_at = end
        now = time.perf_counter()
        if now < end:
            time.sleep(end - now)
        self.sent_bytes += nbytes
        self.seconds += time.perf_counter() - started
        self.collectives += 1

    @property
    def achieved_gbps(self) -> float:
        return self.sent_bytes * 8 / self.seconds / 1e9 if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        return (f"link capped at {self.gbps:g} Gbit/s + {self.latency_ms:g} ms per message: achieved "
                f"{self.achieved_gbps:.3g} Gbit/s over {self.collectives} collectives ({self.sent_bytes / 1e6:.3g} MB "
                f"sent, {self.seconds:.3g} s)")
