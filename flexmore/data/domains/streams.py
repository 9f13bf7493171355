"""Independent random streams per (seed, split, domain): train and val never share a generator state."""

from __future__ import annotations

SPLITS = ("train", "val")


def split_seed(seed: int, split: str, salt: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return (seed * 1_000_003 + SPLITS.index(split) * 7919 + salt) & 0x7FFFFFFF
