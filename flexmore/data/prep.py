"""Tokenise users' own text files (.txt, .jsonl, .parquet) into token shards the loader reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from flexmore.data.shards import write_documents
from flexmore.data.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")


def input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named, or every supported file under a named folder, sorted so the output is deterministic."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise FileNotFoundError(f"folder {p} holds no {'/'.join(SUFFIXES)} files")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ValueError(f"unsupported input {p}: allowed suffixes are {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    if not files:
        raise ValueError("no input files given")
    return files


def read_texts(path: Path, field: str = "text") -> Iterator[str]:
    """.txt: one document per file; .jsonl: one per
    line, ``field`` holding the text; .parquet: one per row of column ``field``."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if field not in rec:
                    raise KeyError(f"{path}:{lineno} has no field {field!r} (fields: {sorted(rec)}); set --field")
                yield rec[field]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading .parquet needs pyarrow: pip install 'flexmore[parquet]'") from e
        table = pq.read_table(path, columns=[field])
        for text in table.column(field).to_pylist():
            yield text
    else:
        raise ValueError(f"unsupported input {path}")


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer: Tokenizer, field: str = "text",
            shard_tokens: int = 1 << 24, overwrite: bool = False) -> Path:
    files = input_files(inputs)

    def docs():
        for path in files:
            for text in read_texts(path, field):
                if text:
                    yield tokenizer.encode(text)

    return write_documents(out_dir, docs(), vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                           tokenizer=tokenizer.name, shard_tokens=shard_tokens, overwrite=overwrite,
                           meta={"inputs": [str(f) for f in files], "field": field})
