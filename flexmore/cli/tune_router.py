"""`flexmore-tune-router`: fit the router of a merged model on a small proxy mix (only router rows and biases train;
every other tensor stays bit-identical), or set the no-training nearest-centroid router; writes a new model folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flexmore.cli import TRUST_HELP, check_max_seqs, check_seq_len
from flexmore.data import load_tokenizer
from flexmore.experts.router import MAX_SEQS, TuneConfig, centroid_router, load_sample, tune_router
from flexmore.store.modeldir import load_model, save_model_dir


def parse_sample(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"sample {text!r}: give NAME=SHARD_FOLDER or NAME=embedded:DOMAIN")
    return name, spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexmore-tune-router", description=__doc__)
    ap.add_argument("--merged", required=True, help="a merged model folder (flexmore-merge)")
    ap.add_argument("--sample", nargs="+", type=parse_sample, required=True, metavar="NAME=DATA",
                    help="one per expert, named as in the merged model: a shard folder (flexmore-prep) or "
                         "embedded:DOMAIN; 'public' defaults to embedded:public")
    ap.add_argument("--max-seqs", type=int, default=2048, help=f"sequences read per sample (at most {MAX_SEQS})")
    ap.add_argument("--seq-len", type=int, required=True, help="the experts' training sequence length")
    ap.add_argument("--steps", type=int, default=TuneConfig.steps)
    ap.add_argument("--lr", type=float, default=TuneConfig.lr)
    ap.add_argument("--micro-batch", type=int, default=TuneConfig.micro_batch)
    ap.add_argument("--route-loss", type=float, default=TuneConfig.route_loss,
                    help="weight of the routing loss (the router's cross-entropy against each sample's owner); 0: "
                         "the language-model loss alone, as FlexOlmo")
    ap.add_argument("--drop", type=float, default=TuneConfig.drop,
                    help="probability that an expert is absent from a training row, routed as if opted out, so that "
                         "an opt-out leaves the other domains where they were; 0: FlexOlmo's tuning")
    ap.add_argument("--centroid", action="store_true", help="set the nearest-centroid router instead (no training)")
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="the new model folder")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = ap.parse_args(argv)
    try:
        check_max_seqs(args.max_seqs)
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
        tc = TuneConfig(steps=args.steps, lr=args.lr, micro_batch=args.micro_batch, route_loss=args.route_loss,
                        drop=args.drop)
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(args.device)
        model = load_model(args.merged, trust_checkpoint=args.trust_checkpoint)
        check_seq_len(args.seq_len, model.cfg.max_seq_len)
        tok = load_tokenizer(args.tokenizer)
        specs = dict(args.sample)
        specs.setdefault("public", "embedded:public")
        samples = {n: load_sample(s, tok, args.seq_len, args.max_seqs) for n, s in specs.items()}
        if args.centroid:
            info = {"router": {"method": "centroid", **centroid_router(model, samples, device)}}
        else:
            info = {"router": {"method": "tuned", "seq_len": args.seq_len, **tune_router(model, samples, tc, device)}}
        out = save_model_dir(model.cpu(), args.out, overwrite=args.overwrite, extra=info, trained_from=args.merged)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"flexmore-tune-router: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: router {info['router']['method']} on samples "
          + ", ".join(f"{n} ({len(v)} seqs)" for n, v in samples.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
