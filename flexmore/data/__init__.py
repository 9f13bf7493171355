"""Data: tokenizers, the embedded multi-domain corpus, token shards and the resumable loader."""

from flexmore.data.embedded import default_cache_dir, embedded_path
from flexmore.data.loader import SequenceLoader, eval_batches
from flexmore.data.prep import prepare
from flexmore.data.shards import ShardWriter, TokenStream, read_index, write_documents
from flexmore.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "default_cache_dir", "embedded_path", "SequenceLoader", "eval_batches", "prepare", "ShardWriter", "TokenStream",
    "read_index", "write_documents", "ByteTokenizer", "HFTokenizer", "load_tokenizer",
]
