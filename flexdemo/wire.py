"""The bytes one replica sends per step: every parameter's payload packed into one flat uint8 buffer.

Layout: [values of all compressed then all dense tensors, in the wire dtype | chunk-local indices], padded to 8 bytes
(with value_bits: the compressed tensors' values as codes and per-chunk scales, ``WireLayout``).
Indices take 12 bits when s*s <= 4096 (two per 3 bytes) or 16 bits otherwise, or (index_coding=elias_fano) each
chunk's sorted positions as one Elias-Fano code (``flexdemo.elias_fano``: 9 bits a position at k = 32 of 64 x 64);
values are bf16 or fp32. With the defaults (64x64 chunks, k = 32, 2-bit codes, Elias-Fano positions) a coefficient
costs 1.44 bytes (bf16 values and 12-bit indices: 3.5), against 12 in the public DeMo code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexdemo import elias_fano
from flexdemo.quant import codes_nbytes, dequantize, pack_codes, unpack_codes

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
INDEX_CODINGS = ("fixed", "elias_fano")


def index_bits_for(chunk: int, requested: int = 0) -> int:
    """12 where s*s fits in 12 bits, else 16; ``requested`` (12 or 16) forces one where it fits."""
    need = max(1, (chunk * chunk - 1).bit_length())
    if need > 16:
        raise ValueError(f"chunk={chunk}: s*s={chunk * chunk} indices need {need} bits; allowed chunk sizes: 1..256")
    if requested not in (0, 12, 16):
        raise ValueError(f"index_bits={requested}; allowed: 0 (auto), 12, 16")
    if requested == 12 and need > 12:
        raise ValueError(f"index_bits=12 cannot hold s*s={chunk * chunk} positions (chunk={chunk}); use 16 or 0")
    return requested or (12 if need <= 12 else 16)


def pack_indices(idx: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) integer indices -> uint8 bytes: 2 bytes each (16) or 3 bytes per pair (12), written into ``out`` (a
    (index_nbytes(n, bits),) uint8 view, e.g. of the payload buffer) when given."""
    n = idx.numel()
    if out is None:
        out = torch.empty(index_nbytes(n, bits), dtype=torch.uint8, device=idx.device)
    if bits == 16:
        out.copy_((idx.to(torch.int32) & 0xFFFF).to(torch.int16).view(torch.uint8))
        return out
    v = idx.to(torch.int32)
    if n % 2:
        v = torch.cat([v, v.new_zeros(1)])
    a, b = v[0::2], v[1::2]
    triples = out.view(-1, 3)  # int32 results are cast to uint8 (their low byte) on assignment
    triples[:, 0] = a & 0xFF
    triples[:, 1] = (a >> 8) | ((b & 0xF) << 4)
    triples[:, 2] = b >> 4
    return out


def unpack_indices(raw: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 (..., index_nbytes(n, bits)) -> int32 (..., n): one replica's row, or all replicas' rows at once."""
    lead = raw.shape[:-1]
    if bits == 16:
        return raw.view(torch.int16).to(torch.int32) & 0xFFFF
    t = raw.reshape(*lead, -1, 3).to(torch.int32)
    out = torch.empty(*lead, t.shape[-2], 2, dtype=torch.int32, device=raw.device)
    out[..., 0] = t[..., 0] | ((t[..., 1] & 0xF) << 8)
    out[..., 1] = (t[..., 1] >> 4) | (t[..., 2] << 4)
    return out.reshape(*lead, -1)[..., :n]


def index_nbytes(n: int, bits: int, k: int = 1, positions: int = 0) -> int:
    """n indices at ``bits`` each, or (``positions`` > 0) as Elias-Fano codes of k among ``positions`` a chunk."""
    if positions:
        return n // k * elias_fano.chunk_nbytes(positions, k)
    return 2 * n if bits == 16 else 3 * ((n + 1) // 2)


@dataclass(frozen=True)
class WireLayout:
    """Sizes of one replica's payload; identical on every replica of a group (same shapes, same config).

    value_bits = 0: [values of the compressed, then the dense tensors, in value_dtype | indices]. value_bits = b: the
    compressed tensors' values as b-bit codes with a bf16 scale per chunk of k (``flexdemo.quant``):
    [dense values in value_dtype | scales | codes | indices]."""

    num_sparse: int  # coefficients sent with an index
    num_dense: int  # values sent densely (1-D and tiny tensors)
    value_dtype: torch.dtype
    index_bits: int
    value_bits: int = 0
    k: int = 1  # coefficients per chunk (quantised: one scale per chunk)
    positions: int = 0  # > 0: the indices as Elias-Fano codes, k among this many (s*s) a chunk; 0: index_bits each

    @property
    def _item(self) -> int:
        return torch.empty(0, dtype=self.value_dtype).element_size()

    @property
    def code_offsets(self) -> tuple[int, int]:
        """value_bits > 0: where the scales and where the codes start (the dense values come first)."""
        dense = self.num_dense * self._item
        return dense, dense + 2 * (self.num_sparse // self.k)

    @property
    def value_nbytes(self) -> int:
        if self.value_bits:
            return self.code_offsets[1] + codes_nbytes(self.num_sparse, self.value_bits)
        return (self.num_sparse + self.num_dense) * self._item

    @property
    def nbytes(self) -> int:
        return -(-(self.value_nbytes + self.indices_nbytes) // 8) * 8

    @property
    def indices_nbytes(self) -> int:
        return index_nbytes(self.num_sparse, self.index_bits, self.k, self.positions)

    def pack(self, sparse_idx: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
             codes: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
        """values: (num_sparse + num_dense,) in value_dtype (quantised: only the dense ones are read; ``codes``
        (num_sparse,) and ``scales`` (num_sparse / k,) carry the rest); sparse_idx: (num_sparse,) -> out (nbytes,)."""
        vb, ib = self.value_nbytes, self.indices_nbytes
        if self.positions:  # each chunk's positions ascending, its values and codes in the same order
            sparse_idx, order = elias_fano.sort_chunks(sparse_idx, self.k)
            if self.value_bits:
                codes = codes.view(-1, self.k).gather(1, order.to(torch.int64))
            else:
                values = torch.cat([values[: self.num_sparse].view(-1, self.k).gather(1, order.to(torch.int64))
                                    .view(-1), values[self.num_sparse :]])
        if self.value_bits:
            db, cb = self.code_offsets
            out[:db] = values[self.num_sparse :].view(torch.uint8)
            out[db:cb] = scales.bfloat16().view(torch.uint8)
            pack_codes(codes, self.value_bits, out[cb:vb])
        else:
            out[:vb] = values.view(torch.uint8)
        if self.positions:
            elias_fano.pack(sparse_idx, self.positions, out[vb : vb + ib])
        else:
            pack_indices(sparse_idx, self.index_bits, out[vb : vb + ib])
        out[vb + ib :] = 0
        return out

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nbytes,) or (replicas, nbytes) uint8 -> indices int32 and values (num_sparse + num_dense, same leading
        dims): views into ``rows`` in value_dtype, or (quantised) dequantised fp32."""
        vb, raw = self.value_nbytes, rows[..., self.value_nbytes : self.value_nbytes + self.indices_nbytes]
        if self.positions:
            idx = elias_fano.unpack(raw, self.positions, self.k)
        else:
            idx = unpack_indices(raw, self.num_sparse, self.index_bits)
        if not self.value_bits:
            return idx, rows[..., :vb].view(self.value_dtype)
        (db, cb), chunks = self.code_offsets, self.num_sparse // self.k
        lead = rows.shape[:-1]
        dense = rows[..., :db].view(self.value_dtype).float()
        scales = rows[..., db:cb].view(torch.bfloat16).float()
        codes = unpack_codes(rows[..., cb:vb], self.num_sparse, self.value_bits)
        sparse = dequantize(codes.reshape(*lead, chunks, self.k), scales, self.value_bits).reshape(*lead, -1)
        return idx, torch.cat([sparse, dense], dim=-1)
