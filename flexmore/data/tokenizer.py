"""Tokenizers: bytes by default (no files), or any Hugging Face tokenizer.json through the `tokenizers` library."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    bos_id: int | None
    name: str  # identifies the vocabulary: shards made with one tokenizer are never read with another

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 = BOS, 257 = EOS, 258 = PAD."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json file. EOS is the first of the usual end-of-text tokens the vocabulary has."""

    EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
    BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (expected a Hugging Face tokenizer.json)")
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = (eos_token,) if eos_token else self.EOS_CANDIDATES
        eos = next((self._tok.token_to_id(t) for t in names if self._tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"tokenizer {path} has none of the end-of-text tokens {names}; name the token that "
                             "ends a document (flexmore-prep --eos-token TOKEN; eos_token= in code)")
        self.eos_id = eos
        self.bos_id = next((self._tok.token_to_id(t) for t in self.BOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        self.name = "hf-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """'byte' for the embedded byte tokenizer, else a path to a tokenizer.json (or a folder holding one); ``eos_token``
    names its end-of-document token where it has none of the usual ones."""
    if spec == "byte":
        if eos_token is not None:
            raise ValueError(f"eos_token={eos_token!r}: the byte tokenizer's end of document is fixed (id 257)")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)
