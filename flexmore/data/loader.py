"""A deterministic, resumable, rank-aware loader of fixed-length sequences.

The stream is cut into non-overlapping windows of seq_len + 1 tokens (the last token of one window is the first of the
next, so every token is a target once). Each epoch visits all windows in an order drawn from (seed, epoch). Global
sample g of the run is window order[g % W] of epoch g // W; step s, micro-batch m, rank r reads samples

    g = ((s * grad_accum + m) * dp_world + r) * micro_batch + i,   i < micro_batch

so ranks read disjoint samples, the global batch is micro_batch * grad_accum * dp_world sequences, and the position
is a pure function of the step: resuming at step s needs no replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flexmore.data.shards import TokenStream


@dataclass
class LoaderState:
    step: int = 0


class SequenceLoader:
    def __init__(self, stream: TokenStream, seq_len: int, micro_batch: int, grad_accum: int = 1,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0):
        if seq_len < 1 or micro_batch < 1 or grad_accum < 1:
            raise ValueError(f"seq_len={seq_len}, micro_batch={micro_batch}, grad_accum={grad_accum} must be >= 1")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world})")
        self.stream, self.seq_len, self.micro_batch, self.grad_accum = stream, seq_len, micro_batch, grad_accum
        self.dp_rank, self.dp_world, self.seed = dp_rank, dp_world, seed
        self.num_windows = (stream.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"data has {stream.num_tokens} tokens: too few for one sequence of seq_len={seq_len} (+1 target)"
            )
        self.state = LoaderState()
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_world

    @property
    def epoch_steps(self) -> float:
        return self.num_windows / self.global_batch

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def samples(self, step: int, micro: int) -> np.ndarray:
        first = ((step * self.grad_accum + micro) * self.dp_world + self.dp_rank) * self.micro_batch
        return np.arange(first, first + self.micro_batch)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (micro_batch, seq_len) int64."""
        rows = []
        for g in self.samples(step, micro):
            w = int(self._order(int(g // self.num_windows))[g % self.num_windows])
            rows.append(self.stream.read(w * self.seq_len, self.seq_len + 1))
        arr = torch.from_numpy(np.stack(rows))
        return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The grad_accum micro-batches of the current step; advances the position."""
        out = [self.batch(self.state.step, m) for m in range(self.grad_accum)]
        self.state.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.state.step, "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch}

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        if strict:
            same_data_order(sd, self.state_dict())
        self.state.step = int(sd["step"])


ORDER_KEYS = {"seed": "data.seed", "seq_len": "train.seq_len", "extra_rows": "public rows per micro-batch",
              "global_batch": "global batch (train.micro_batch x train.grad_accum x ranks)"}


def same_data_order(saved: dict, now: dict) -> None:
    """A saved loader position means something only under the same seed, sequence length and global batch."""
    diff = [f"{ORDER_KEYS.get(k, k)}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in sorted(now)
            if k != "step" and k in saved and saved[k] != now[k]]
    if diff:
        raise ValueError("cannot resume the data order: " + ", ".join(diff) + " (its saved position would mean "
                         "other data). Restore those settings, or set train.force_resume=true to keep the weights "
                         "and optimizer state and restart the data order from the resumed step")


def first_windows(stream: TokenStream, seq_len: int, max_windows: int) -> torch.Tensor:
    """(n, seq_len + 1) int64: the first ``max_windows`` non-overlapping windows of a stream, in order."""
    n = min((stream.num_tokens - 1) // seq_len, max_windows)
    if n < 1:
        raise ValueError(f"data {[str(p) for p in stream.paths]} has {stream.num_tokens} tokens: too few for "
                         f"seq_len={seq_len}")
    return torch.from_numpy(np.stack([stream.read(w * seq_len, seq_len + 1) for w in range(n)]))


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first windows of a validation set, in order: the same every time, so losses are comparable across steps."""
    windows = first_windows(stream, seq_len, batch_size * max_batches)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows.split(batch_size)]


class MixedLoader:
    """Every micro-batch holds exactly ``extra_rows`` sequences of a second stream (e.g. public negatives for an expert)
    after ``micro_batch - extra_rows`` of the main one; each stream has its own deterministic, resumable order.

    Each micro-batch is (x, y, model inputs): with ``hold``, ``hold_rows`` marks the second stream's rows; with
    ``targets`` = (main, extra), ``route_targets`` gives each row the expert its stream belongs to."""

    def __init__(self, stream: TokenStream, extra: TokenStream, seq_len: int, micro_batch: int, extra_rows: int,
                 grad_accum: int = 1, dp_rank: int = 0, dp_world: int = 1, seed: int = 0, hold: bool = False,
                 targets: tuple[int, int] | None = None):
        if not 0 < extra_rows < micro_batch:
            raise ValueError(f"extra_rows={extra_rows} must be in [1, micro_batch={micro_batch}): at least one row of "
                             "each stream per micro-batch")
        self.main = SequenceLoader(stream, seq_len, micro_batch - extra_rows, grad_accum, dp_rank, dp_world, seed)
        self.extra = SequenceLoader(extra, seq_len, extra_rows, grad_accum, dp_rank, dp_world, seed + 1)
        self.micro_batch, self.extra_rows, self.grad_accum, self.dp_world = micro_batch, extra_rows, grad_accum, dp_world
        self.hold, self.targets, self.seed, self.seq_len = hold, targets, seed, seq_len

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_world

    @property
    def epoch_steps(self) -> float:
        return self.main.epoch_steps

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        mask = torch.arange(self.micro_batch) >= self.micro_batch - self.extra_rows
        inputs = {}
        if self.hold:
            inputs["hold_rows"] = mask
        if self.targets is not None:
            inputs["route_targets"] = torch.where(mask, self.targets[1], self.targets[0])
        return [(torch.cat([xa, xb]), torch.cat([ya, yb]), inputs)
                for (xa, ya), (xb, yb) in zip(self.main.next_step(), self.extra.next_step())]

    def state_dict(self) -> dict:
        return {**self.main.state_dict(), "global_batch": self.global_batch, "extra_rows": self.extra_rows}

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        if strict:
            same_data_order(sd, self.state_dict())
        self.main.state.step = self.extra.state.step = int(sd["step"])
