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


def _high_bits(positions: int, k: int) -> int:
    return k + ((positions - 1) >> low_bits(positions, k)) + 1


def chunk_nbytes(positions: int, k: int) -> int:
    return -(-(k * low_bits(positions, k) + _high_bits(positions, k)) // 8)


def sort_chunks(idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunks * k,) positions -> each chunk's positions in ascending order (chunks, k), and the permutation that
    sorted them, to reorder the values with."""
    return idx.view(-1, k).sort(dim=1, stable=True)


def pack(sorted_idx: torch.Tensor, positions: int, out: torch.Tensor) -> torch.Tensor:
    """(chunks, k) ascending positions < ``positions`` -> ``out`` (chunks * chunk_nbytes,) uint8: per chunk the k
    low parts (l bits each, lowest bit first), then the bitmap of the high parts; bits fill each byte from its low
    end."""
    chunks, k = sorted_idx.shape
    lo, nb = low_bits(positions, k), chunk_nbytes(positions, k)
    x = sorted_idx.to(torch.int64)
    bits = torch.zeros(chunks, nb * 8, dtype=torch.uint8, device=x.device)
    if lo:
        shifts = torch.arange(lo, device=x.device)
        bits[:, : k * lo] = ((x[..., None] >> shifts) & 1).reshape(chunks, k * lo)
    high = (x >> lo) + torch.arange(k, device=x.device)
    bits[:, k * lo :].scatter_(1, high, 1)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=x.device)  # no host tensor: graph-capturable
    out.copy_((bits.view(chunks, nb, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8).reshape(-1))
    return out


def unpack(raw: torch.Tensor, positions: int, k: int) -> torch.Tensor:
    """uint8 (..., chunks * chunk_nbytes) -> int32 (..., chunks * k), each chunk's positions in ascending order."""
    lo, nb, hb = low_bits(positions, k), chunk_nbytes(positions, k), _high_bits(positions, k)
    lead = raw.shape[:-1]
    by = raw.reshape(*lead, -1, nb)
    bits = ((by[..., None] >> torch.arange(8, dtype=torch.uint8, device=raw.device)) & 1).flatten(-2)
    # the k set bits of the bitmap, in ascending order (a stable sort puts the ones first, in place order)
    at = torch.argsort(bits[..., k * lo : k * lo + hb], dim=-1, descending=True, stable=True)[..., :k]
    idx = (at - torch.arange(k, device=raw.device)) << lo
    if lo:
        weights = 1 << torch.arange(lo, device=raw.device)
        idx = idx + (bits[..., : k * lo].unflatten(-1, (k, lo)).to(torch.int64) * weights).sum(-1)
    return idx.to(torch.int32).flatten(-2)
