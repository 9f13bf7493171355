"""A chunk's k positions in fewer bits: sorted, then Elias-Fano coded, the same size for every chunk.

Of k positions among u = s*s, sorted, each keeps its low l = floor(log2(u / k)) bits as they are; the high parts, a
non-decreasing sequence h_0 <= ... <= h_{k-1} <= (u - 1) >> l, go as one bitmap with bit h_i + i set. A chunk takes
k (l + 1) + ((u - 1) >> l) + 1 bits, rounded up to bytes: 36 bytes for 32 of 64 x 64 against 48 at 12 bits each, and
33.3 for any code (log2 C(u, k) bits). The size depends on (u, k) only, so every replica's payload keeps one size (an
all-gather needs that). Sorting costs the receiver nothing: a chunk decodes as a sum over its positions, which the
sender reorders with their values. Repeated positions are allowed (a non-decreasing sequence).
"""

from __future__ import annotations

import torch


def low_bits(positions: int, k: int) -> int:
    return max(0, (positions // k).bit_length() - 1)


def high_bits(positions: int, k: int) -> int:
    return k + ((positions - 1) >> low_bits(positions, k)) + 1


def chunk_nbytes(positions: int, k: int) -> int:
    return -(-(k * low_bits(positions, k) + high_bits(positions, k)) // 8)


def sort_chunks(idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunks * k,) positions -> each chunk's positions in ascending order (chunks, k), and the permutation that
    sorted them, to reorder the values with."""
    return idx.view(-1, k).sort(dim=1, stable=True)


def _field_dtype(width: int) -> torch.dtype:
    """The narrowest dtype that holds a field of ``width`` bits built from shifted bits (less memory traffic)."""
    return torch.uint8 if width <= 8 else torch.int32


def pack(sorted_idx: torch.Tensor, positions: int, out: torch.Tensor) -> torch.Tensor:
    """(chunks, k) ascending positions < ``positions`` -> ``out`` (chunks * chunk_nbytes,) uint8: per chunk the k
    low parts (l bits each, lowest bit first), then the bitmap of the high parts; bits fill each byte from its low
    end."""
    chunks, k = sorted_idx.shape
    lo, nb = low_bits(positions, k), chunk_nbytes(positions, k)
    dev = sorted_idx.device
    x = sorted_idx.to(torch.int32)
    bits = torch.zeros(chunks, nb * 8, dtype=torch.uint8, device=dev)
    if lo:
        dt = _field_dtype(lo)
        low = (x & ((1 << lo) - 1)).to(dt)
        bits[:, : k * lo] = ((low[..., None] >> torch.arange(lo, dtype=dt, device=dev)) & 1).reshape(chunks, k * lo)
    high = ((x >> lo) + torch.arange(k, dtype=torch.int32, device=dev)).to(torch.int64)
    bits[:, k * lo :].scatter_(1, high, 1)
    shifted = bits.view(chunks, nb, 8) << torch.arange(8, dtype=torch.uint8, device=dev)  # no host tensor: capturable
    out.copy_(shifted.sum(-1, dtype=torch.uint8).reshape(-1))  # the bits of a byte are disjoint: the sum is their OR
    return out


def unpack(raw: torch.Tensor, positions: int, k: int) -> torch.Tensor:
    """uint8 (..., chunks * chunk_nbytes) -> int32 (..., chunks * k), each chunk's positions in ascending order."""
    lo, nb, hb = low_bits(positions, k), chunk_nbytes(positions, k), high_bits(positions, k)
    lead, dev = raw.shape[:-1], raw.device
    by = raw.reshape(*lead, -1, nb)
    bits = ((by[..., None] >> torch.arange(8, dtype=torch.uint8, device=dev)) & 1).flatten(-2)
    # the k set bits of the bitmap, in ascending order (a stable sort puts the ones first, in place order)
    at = torch.argsort(bits[..., k * lo : k * lo + hb], dim=-1, descending=True, stable=True)[..., :k]
    idx = ((at - torch.arange(k, device=dev)) << lo).to(torch.int32)
    if lo:
        dt = _field_dtype(lo)
        low = bits[..., : k * lo].unflatten(-1, (k, lo)).to(dt) << torch.arange(lo, dtype=dt, device=dev)
        idx += low.sum(-1, dtype=dt).to(torch.int32)
    return idx.flatten(-2)
