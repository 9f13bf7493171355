"""Token shards: flat uint16/uint32 memmaps plus an index.json. Written to a temp folder and renamed into place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from flexmore.atomic import publish, temp_dir_for

INDEX = "index.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents (each followed by EOS) and writes shards of ``shard_tokens`` tokens.

    Nothing appears at ``out_dir`` until ``close()`` renames the finished folder there, so a crash never leaves a
    half-written dataset that looks complete.
    """

    def __init__(self, out_dir: str | Path, vocab_size: int, eos_id: int, tokenizer: str,
                 shard_tokens: int = 1 << 24, meta: dict | None = None, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists; pass overwrite to replace it")
        self.tmp = temp_dir_for(self.out_dir)
        self.tmp.mkdir(parents=True)
        self.vocab_size, self.eos_id, self.tokenizer = vocab_size, eos_id, tokenizer
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens, self.meta, self.overwrite = shard_tokens, meta or {}, overwrite
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.num_tokens = self.num_documents = 0
        self.max_id = -1

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr.max() if arr.max() >= self.vocab_size else arr.min())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        arr = np.append(arr, self.eos_id).astype(self.dtype)
        self.max_id = max(self.max_id, int(arr.max()))
        self.buf.append(arr)
        self.buffered += arr.size
        self.num_documents += 1
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf)
        head, rest = data[:n], data[n:]
        name = f"shard_{len(self.shards):05d}.bin"
        head.tofile(self.tmp / name)
        self.shards.append({"file": name, "num_tokens": int(head.size)})
        self.num_tokens += int(head.size)
        self.buf, self.buffered = ([rest] if rest.size else []), int(rest.size)

    def close(self) -> Path:
        if self.buffered:
            self._flush(self.buffered)
        if self.num_tokens == 0:
            shutil.rmtree(self.tmp)
            raise ValueError(f"no tokens were written for {self.out_dir}: the input is empty")
        index = {
            "version": FORMAT_VERSION, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
            "eos_id": self.eos_id, "dtype": self.dtype.name, "num_tokens": self.num_tokens,
            "num_documents": self.num_documents, "max_token_id": self.max_id, "shards": self.shards, "meta": self.meta,
        }
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1))
        return publish(self.tmp, self.out_dir, overwrite=self.overwrite)


def write_documents(out_dir: str | Path, docs: Iterable[Sequence[int]], **kw) -> Path:
    writer = ShardWriter(out_dir, **kw)
    try:
        for ids in docs:
            writer.add(ids)
        return writer.close()
    except BaseException:
        shutil.rmtree(writer.tmp, ignore_errors=True)
        raise


def read_index(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if not (path / INDEX).is_file():
        raise FileNotFoundError(f"data path {path} has no {INDEX}; make one with `flexmore-prep`")
    try:
        index = json.loads((path / INDEX).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / INDEX} is not valid JSON ({e}); remake the folder with flexmore-prep") from None
    if not isinstance(index, dict) or index.get("version") != FORMAT_VERSION:
        got = index.get("version") if isinstance(index, dict) else None
        raise ValueError(f"{path / INDEX} has format version {got}; expected {FORMAT_VERSION}")
    if index["num_tokens"] <= 0:
        raise ValueError(f"data path {path} is empty (0 tokens)")
    return index


class TokenStream:
    """Several shard folders read as one flat token array (memory-mapped, nothing loaded up front)."""

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise ValueError("no data paths given")
        self.paths = [Path(p) for p in paths]
        self.indexes = [read_index(p) for p in self.paths]
        tokenizers = {ix["tokenizer"] for ix in self.indexes}
        if len(tokenizers) > 1:
            raise ValueError(f"data paths were made with different tokenizers: {sorted(tokenizers)}")
        self.tokenizer = tokenizers.pop()
        self.vocab_size = max(ix["vocab_size"] for ix in self.indexes)
        self.max_token_id = max(ix["max_token_id"] for ix in self.indexes)
        self.arrays: list[np.memmap] = []
        for p, ix in zip(self.paths, self.indexes):
            for sh in ix["shards"]:
                f, dtype = p / sh["file"], np.dtype(ix["dtype"])
                size = f.stat().st_size if f.is_file() else -1
                if size != sh["num_tokens"] * dtype.itemsize:
                    raise ValueError(f"{f}: {'missing' if size < 0 else f'{size} bytes'}, but {p / INDEX} says "
                                     f"{sh['num_tokens']} tokens of {dtype.name} ({sh['num_tokens'] * dtype.itemsize} "
                                     "bytes); the folder is damaged: remake it with flexmore-prep")
                self.arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=(sh["num_tokens"],)))
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.num_tokens = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pos, filled = start - int(self.offsets[i]), 0
        while filled < length:
            take = min(length - filled, self.arrays[i].size - pos)
            out[filled : filled + take] = self.arrays[i][pos : pos + take]
            filled, i, pos = filled + take, i + 1, 0
        if length and out.max() > self.max_token_id:  # cheap per window; a lying index would fail deep in the model
            raise ValueError(f"data {[str(p) for p in self.paths]}: token id {int(out.max())} at tokens [{start}, "
                             f"{start + length}) is above the max_token_id {self.max_token_id} of its index.json; "
                             "the folder is damaged: remake it with flexmore-prep")
        return out
