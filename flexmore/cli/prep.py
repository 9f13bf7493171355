"""`flexmore-prep`: tokenise your .txt / .jsonl / .parquet / .arrow files or Hugging Face datasets folders (save_to_disk)
into token shards for `data=shards`."""

from __future__ import annotations

import argparse
import sys

from flexmore.data.prep import prepare
from flexmore.data.shards import read_index
from flexmore.data.tokenizer import HFTokenizer, load_tokenizer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexmore-prep", description=__doc__)
    p.add_argument("inputs", nargs="+", help="files, datasets folders (save_to_disk; a DatasetDict's train split), or folders searched for "
                        ".txt, .jsonl, .parquet, .arrow")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a path to a tokenizer.json")
    p.add_argument("--eos-token", default=None,
                   help="the token that ends each document, for a tokenizer.json without a usual one "
                        f"({', '.join(HFTokenizer.EOS_CANDIDATES)})")
    p.add_argument("--field", default="text", help="JSONL field / parquet column holding the text (default: text)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.shard_tokens < 1:
        parser().error(f"--shard-tokens={args.shard_tokens} must be >= 1")
    try:
        out = prepare(args.inputs, args.out, load_tokenizer(args.tokenizer, args.eos_token), field=args.field,
                      shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, ImportError) as e:
        print(f"flexmore-prep: error: {e}", file=sys.stderr)
        return 2
    ix = read_index(out)
    print(f"wrote {ix['num_tokens']:,} tokens from {ix['num_documents']:,} documents in {len(ix['shards'])} "
          f"shard(s) ({ix['dtype']}, tokenizer {ix['tokenizer']}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
