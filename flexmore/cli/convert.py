"""`flexmore-convert`: a training checkpoint of your own run -> a model folder (config.json + model.safetensors),
the form in which a model is handed to others: reading it runs no code."""

from __future__ import annotations

import argparse
import sys

from flexmore.store.modeldir import load_model, save_model_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexmore-convert", description=__doc__)
    ap.add_argument("--checkpoint", required=True,
                    help="a checkpoint folder (checkpoints/step_N) or a run folder (its latest checkpoint) that you "
                         "wrote yourself: its DCP metadata is unpickled")
    ap.add_argument("--out", required=True, help="the model folder to write")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        model = load_model(args.checkpoint, trust_checkpoint=True)
        out = save_model_dir(model, args.out, overwrite=args.overwrite, trained_from=args.checkpoint)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
