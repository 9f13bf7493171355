"""`flexmore-lowrank`: low-rank versions of a trained full expert at a list of ranks (truncated SVD of its delta)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from flexmore.cli import TRUST_HELP, check_max_seqs, check_seq_len
from flexmore.data import load_tokenizer
from flexmore.experts.artifact import base_hash, load_artifact, read_manifest
from flexmore.experts.extract import save_lowrank
from flexmore.experts.refit import REFIT_STEPS, save_refit
from flexmore.experts.router import TuneConfig, load_sample, own_sample_spec
from flexmore.model.experts import PROJECTIONS, Ranks, break_even_rank
from flexmore.store.modeldir import load_model


def parse_rank(text: str) -> list[int]:
    try:
        return Ranks.of(text).as_list()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"rank {text!r}: {e}") from None


def public_ffn(model, n_layers: int) -> dict:
    sd = model.state_dict()
    return {f"layers.{i}.{p}.weight": sd[f"blocks.{i}.ffn.experts.0.{p}.weight"] for i in range(n_layers) for p in PROJECTIONS}


def rank_tag(ranks: list[int]) -> str:
    """The artifact's suffix: one number for a uniform rank, else gate-up-down."""
    return str(ranks[0]) if len(set(ranks)) == 1 else "-".join(map(str, ranks))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexmore-lowrank", description=__doc__)
    ap.add_argument("--base", required=True, help="the public base: a model folder, or a run folder (its model folder)")
    ap.add_argument("--expert", required=True, help="a full expert's artifact folder")
    ap.add_argument("--ranks", required=True, nargs="+", type=parse_rank, help="ranks: 8 16 64, or gate,up,down")
    ap.add_argument("--out", required=True, help="folder for <name>-r<rank> artifacts and report.json")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--refit-steps", type=int, default=REFIT_STEPS,
                    help="re-fit each extracted expert's router row and bias on --sample and --public-sample, this "
                         "many steps (flexmore.experts.refit; 0: keep the rows trained beside the full expert, which "
                         "at middle ranks send public tokens to the truncated one)")
    ap.add_argument("--sample", default=None, help="refit: your data (shard folder or embedded:DOMAIN); default "
                                                   "the expert's training data (its shard folder or domain)")
    ap.add_argument("--public-sample", default="embedded:public", help="refit: the public data")
    ap.add_argument("--seq-len", type=int, default=256, help="refit: window length")
    ap.add_argument("--max-seqs", type=int, default=1024, help="refit: sequences per sample")
    ap.add_argument("--tokenizer", default="byte", help="refit: the tokenizer the samples are read with")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = ap.parse_args(argv)
    try:
        if args.refit_steps < 0:
            raise ValueError(f"--refit-steps={args.refit_steps} must be >= 0")
        tune = TuneConfig(steps=args.refit_steps, route_loss=0.0) if args.refit_steps > 0 else None
        if tune is not None:
            check_max_seqs(args.max_seqs)
        base = load_model(args.base, trust_checkpoint=args.trust_checkpoint)
        tensors, man = load_artifact(args.expert)
        if man.kind != "full":
            raise ValueError(f"{args.expert} is a {man.kind} expert; extraction needs a full expert")
        if man.base_hash != base_hash(base.state_dict()):
            raise ValueError(f"{args.expert} was trained against another base than {args.base}")
        out = Path(args.out)
        names = [f"{man.name}-r{rank_tag(ranks)}" for ranks in args.ranks]
        if len(set(names)) < len(names):
            raise ValueError(f"--ranks names one rank twice: {[rank_tag(r) for r in args.ranks]}")
        there = [n for n in names if (out / n).exists()]
        if there and not args.overwrite:
            raise ValueError(f"{', '.join(str(out / n) for n in there)} already exist(s); pass --overwrite to replace")
        if tune is not None:
            check_seq_len(args.seq_len, base.cfg.max_seq_len)
            tok = load_tokenizer(args.tokenizer)
            own = load_sample(args.sample or own_sample_spec(man.domain), tok, args.seq_len, args.max_seqs)
            public_sample = load_sample(args.public_sample, tok, args.seq_len, args.max_seqs)
    except (FileNotFoundError, ValueError) as e:
        print(f"flexmore-lowrank: error: {e}", file=sys.stderr)
        return 2
    cfg, L = base.cfg, base.cfg.n_layers
    public = public_ffn(base, L)
    # a refit reads each extraction from this run's own staging folder (two runs into one --out never share it),
    # so every final folder is written once, whole
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracted-", dir=out)) if tune is not None else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = []
        be = {"gate_proj": break_even_rank(cfg.d_ffn, cfg.d_model), "up_proj": break_even_rank(cfg.d_ffn, cfg.d_model),
              "down_proj": break_even_rank(cfg.d_model, cfg.d_ffn)}
        print(f"{'ranks':>14} {'projection':<10}{'energy':>9}{'rel err':>10}  "
              f"storage (break-even {be['gate_proj']:.0f})")
        for name, ranks in zip(names, args.ranks):
            if tune is None:
                path, low_man, rows = save_lowrank(out / name, public, tensors, man, L, ranks, args.overwrite)
            else:
                extracted, low_man, rows = save_lowrank(staging / name, public, tensors, man, L, ranks, overwrite=True)
                path = save_refit(args.base, extracted, out / name, own, public_sample, tune, device,
                                  overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint)
                fit = read_manifest(path).training["router_refit"]
                print(f"{name}: router row re-fitted, {fit['steps']} steps, loss {fit['loss_first']:.4f} -> "
                      f"{fit['loss_last']:.4f} on {fit['samples']} sequences")
            params = low_man.params
            for proj, r in zip(PROJECTIONS, ranks):
                sel = [x for x in rows if x.projection == proj]
                energy = sum(x.energy for x in sel) / len(sel)
                err = max(x.rel_error for x in sel)
                storage = "dense (past break-even)" if sel[0].dense else "factors A, B"
                print(f"{str(ranks):>14} {proj:<10}{energy:>9.4f}{err:>10.2e}  {storage}")
                report.append({"ranks": ranks, "projection": proj, "rank": r, "energy": energy, "max_rel_error": err,
                               "dense": sel[0].dense, "artifact": str(path), "params": params})
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
