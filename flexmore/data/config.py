"""The data section of a run's config (``data.*``): validated where it is built, before any data is generated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from flexmore.data.domains import DOMAINS


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class DataConfig:
    """Training data: the embedded domains (default) or shard folders made by ``flexmore-prep``."""

    source: str = "embedded"  # embedded | shards
    domains: list[str] = field(default_factory=lambda: ["public"])  # embedded: training domains (concatenated)
    paths: list[str] = field(default_factory=list)  # shards: training shard folders
    val_domains: list[str] = field(default_factory=lambda: ["public", "code", "math", "facts"])
    val_paths: dict[str, str] = field(default_factory=dict)  # shards: name -> validation shard folder
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    train_chars: int = 4_000_000  # embedded: size of each training domain (characters of generated text)
    val_chars: int = 200_000
    seed: int = 0
    cache_dir: Optional[str] = None  # embedded: where generated shards are kept (default ~/.cache/flexmore)

    def __post_init__(self) -> None:
        _need(self.source in ("embedded", "shards"), f"data.source={self.source!r}; allowed: 'embedded', 'shards'")
        if self.source == "embedded":
            for d in list(self.domains) + list(self.val_domains):
                _need(d in DOMAINS, f"data domain {d!r} is not an embedded domain; allowed: {', '.join(DOMAINS)}")
            _need(len(self.domains) > 0, "data.domains is empty: name at least one embedded training domain")
            _need(self.train_chars > 0 and self.val_chars > 0, "data.train_chars and data.val_chars must be > 0")
        else:
            _need(len(self.paths) > 0, "data.source=shards needs data.paths: one or more folders made by flexmore-prep")
