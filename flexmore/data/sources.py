"""Turn a DataConfig into token streams: the training mix and one validation stream per named domain."""

from __future__ import annotations

from flexmore.data.config import DataConfig
from flexmore.data.embedded import embedded_path
from flexmore.data.shards import TokenStream
from flexmore.data.tokenizer import Tokenizer


def build_streams(cfg: DataConfig, tokenizer: Tokenizer, model_vocab: int) -> tuple[TokenStream, dict[str, TokenStream]]:
    """Builds (or finds cached) shards and checks they fit this tokenizer and model before training starts."""
    if cfg.source == "embedded":
        train = TokenStream([embedded_path(d, "train", tokenizer, cfg.train_chars, cfg.seed, cfg.cache_dir)
                             for d in cfg.domains])
        val = {d: TokenStream([embedded_path(d, "val", tokenizer, cfg.val_chars, cfg.seed, cfg.cache_dir)])
               for d in cfg.val_domains}
    else:
        train = TokenStream(cfg.paths)
        val = {name: TokenStream([p]) for name, p in cfg.val_paths.items()}
    for name, stream in [("train", train), *val.items()]:
        if stream.tokenizer != tokenizer.name:
            raise ValueError(
                f"{name} data {[str(p) for p in stream.paths]} was tokenised with {stream.tokenizer!r}, "
                f"but data.tokenizer gives {tokenizer.name!r}; re-run flexmore-prep with the same tokenizer"
            )
        if stream.max_token_id >= model_vocab:
            raise ValueError(
                f"{name} data {[str(p) for p in stream.paths]} holds token id {stream.max_token_id}, outside the "
                f"model's vocabulary of {model_vocab} (ids 0..{model_vocab - 1}); raise model.vocab_size"
            )
    return train, val
