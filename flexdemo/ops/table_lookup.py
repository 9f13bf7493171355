"""The device side of a ``ChunkTable`` launch: which tensor a program's chunk belongs to, that tensor's shape, and
where the chunk sits in it and in the payload (kept apart from ``chunk_table.py``, which needs no Triton)."""

import triton
import triton.language as tl


@triton.jit
def table_chunk(c, owner_ptr, table_ptr):
    """Launch chunk c -> (tensor t, its rows, cols and chunk-grid columns, the chunk's index in t (row-major over its
    grid), its payload chunk): ``ChunkTable.meta``'s columns, read for t = tensor_of_chunk[c]."""
    t = tl.load(owner_ptr + c)
    meta = table_ptr + t * 5
    local = (c - tl.load(meta + 3)).to(tl.int32)
    return (t, tl.load(meta).to(tl.int32), tl.load(meta + 1).to(tl.int32), tl.load(meta + 2).to(tl.int32), local,
            tl.load(meta + 4) + local)
