"""Which rank went silent: every rank records the step it is on in the process group's store, so when a collective
times out (``parallel.timeout_s``) the ranks whose last step is behind the others' are the ones that stopped."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

KEY = "flexmore/step/{}"
PHASES = ("loading data", "forward and backward", "gradient sync and update")  # the order within a step


def is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, (RuntimeError, dist.DistError)) and ("timed out" in text or "timeout" in text)


class Heartbeat:
    def __init__(self):
        self.store = None
        if dist.is_initialized():
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, ValueError, AttributeError):  # no store: timeouts still end the run, unnamed
                self.store = None

    def beat(self, step: int, phase: int = 0) -> None:
        """``step`` 0-based, ``phase`` an index into PHASES."""
        if self.store is not None:
            self.store.set(KEY.format(dist.get_rank()), str(step * len(PHASES) + phase))

    def last_steps(self) -> dict[int, int | None]:
        """Each rank's last recorded position (step x phases + phase; None: never recorded); empty when the store
        cannot be read."""
        if self.store is None:
            return {}
        try:
            self.store.set_timeout(timedelta(seconds=5))
            keys = {r: KEY.format(r) for r in range(dist.get_world_size())}
            return {r: int(self.store.get(k)) if self.store.check([k]) else None for r, k in keys.items()}
        except (RuntimeError, dist.DistError):
            return {}

    def silent(self) -> str:
        steps = self.last_steps()
        if not steps:
            return "the store cannot say which rank stopped"
        top = max(s for s in steps.values() if s is not None)
        late = {r: s for r, s in steps.items() if s is None or s < top}
        if not late:
            return f"every rank reached {where(top)}, so one stopped inside a collective there"
        return "; ".join(f"rank {r} stopped reporting at {'its start' if s is None else where(s)}"
                         for r, s in late.items()) + f" (the others reached {where(top)})"


def where(position: int) -> str:
    step, phase = divmod(position, len(PHASES))
    return f"step {step + 1} ({PHASES[phase]})"
