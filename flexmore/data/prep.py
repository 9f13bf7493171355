"""Tokenise users' own text (.txt, .jsonl, .parquet, .arrow files, and Hugging Face ``datasets`` folders written by
``save_to_disk``) into token shards the loader reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from flexmore.data.shards import write_documents
from flexmore.data.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
HF_DATASET_FILES = ("state.json", "dataset_dict.json")  # a Dataset / DatasetDict folder (datasets' save_to_disk)


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in HF_DATASET_FILES)


def input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named, a ``datasets`` folder as one input, or every supported file under another named folder, sorted so
    the output is deterministic."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if is_hf_dataset(p):
            files.append(p)
        elif p.is_dir():
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
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); is it a binary file?") from None
    elif path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: {e.reason}); is it a binary "
                                     "file?") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{lineno}: a JSON {type(rec).__name__}, not an object with a "
                                     f"{field!r} field")
                if field not in rec:
                    raise KeyError(f"{path}:{lineno} has no field {field!r} (fields: {sorted(rec)}); set --field")
                if not isinstance(rec[field], str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} is a {type(rec[field]).__name__}, not text")
                yield rec[field]
    elif is_hf_dataset(path):
        yield from _hf_dataset_texts(path, field)
    elif path.suffix == ".arrow":  # one of datasets' cache / save_to_disk files (Arrow IPC stream)
        import pyarrow as pa

        with pa.memory_map(str(path)) as f:
            table = pa.ipc.open_stream(f).read_all()
        _need_column(path, field, table.column_names)
        yield from table.column(field).to_pylist()
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


def _need_column(path: Path, field: str, columns: list[str]) -> None:
    if field not in columns:
        raise KeyError(f"{path} has no column {field!r} (columns: {columns}); set --field")


def _hf_dataset_texts(path: Path, field: str) -> Iterator[str]:
    """A ``save_to_disk`` folder: a Dataset, or a DatasetDict's ``train`` split (name another split's folder to use
    it)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a Hugging Face datasets folder: reading it needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path} is a DatasetDict without a 'train' split (splits: {sorted(ds)}); name the "
                             f"split's folder, e.g. {path / sorted(ds)[0]}")
        ds = ds["train"]
    _need_column(path, field, ds.column_names)
    for text in ds[field]:
        yield text


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
