"""Materialise the embedded domains as token shards in a cache folder, once, keyed by everything that shapes them."""

from __future__ import annotations

import os
from pathlib import Path

from flexmore.data.domains import get_domain
from flexmore.data.shards import INDEX, write_documents
from flexmore.data.tokenizer import Tokenizer

GENERATOR_VERSION = 3  # 2: question-and-answer documents in the facts training text; 3: facts trained in more wordings


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXMORE_CACHE", Path.home() / ".cache" / "flexmore"))


def embedded_path(domain: str, split: str, tokenizer: Tokenizer, num_chars: int, seed: int,
                  cache_dir: str | Path | None = None) -> Path:
    """Build (if missing) and return the shard folder of one domain split."""
    get_domain(domain)  # validates the name early
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"v{GENERATOR_VERSION}" / tokenizer.name / f"{domain}-{split}-s{seed}-c{num_chars}"
    if (out / INDEX).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)

    def docs():
        total = 0
        for text in get_domain(domain).documents(split, seed):
            yield tokenizer.encode(text)
            total += len(text)
            if total >= num_chars:
                return

    try:
        return write_documents(out, docs(), vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                               tokenizer=tokenizer.name, meta={"domain": domain, "split": split, "seed": seed,
                                                               "num_chars": num_chars})
    except FileExistsError:  # another process (a rank sharing this cache) published it after the check above
        if (out / INDEX).is_file():
            return out
        raise
