"""`flexmore-sweep`: extract each full expert at ranks 2^0..2^k, evaluate single-expert, uniform-rank and best-rank
mixtures (resumable), then write the report: tidy table, regression, best ranks, plots, summary, and optionally the
best mixture under a parameter budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flexmore.cli import TRUST_HELP, check_max_seqs, check_seq_len
from flexmore.data import load_tokenizer
from flexmore.eval.evaluate import evaluate_model
from flexmore.eval.table import write_table
from flexmore.eval.tasks import build_tasks, embedded_val_sets
from flexmore.experts.artifact import base_hash, read_manifest
from flexmore.experts.refit import REFIT_STEPS
from flexmore.experts.router import TuneConfig, load_sample, own_sample_spec
from flexmore.model import count_params
from flexmore.model.config import ROUTE_CONTEXTS
from flexmore.store.modeldir import check_trusted, is_checkpoint, load_model, read_config, save_model_dir
from flexmore.study.allocate import allocate
from flexmore.study.report import write_report
from flexmore.study.results import ResultStore
from flexmore.study.sweep import (
    FULL,
    RouterFit,
    build_mixture,
    cell_key,
    how_routed,
    lowrank_path,
    run_sweep,
    selection_score,
)


def energy_curves(out: Path) -> dict[str, dict[int, float]]:
    curves: dict[str, dict[int, float]] = {}
    for folder in sorted(p.parent for p in (out / "lowrank").glob("*/manifest.json")):
        m = read_manifest(folder)
        if m.energy is not None:
            curves.setdefault(m.extracted_from, {})[m.ranks[0]] = m.energy
    return curves


def budget_choice(rows: list[dict], budget: int, params_of) -> tuple[dict, int, float]:
    """Per expert, options rank -> (its own parameters, its selection score from design (a))."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("design") == "a":
            cells.setdefault((r["mixture"], str(r["rank"])), []).append(r)
    options: dict[str, dict] = {}
    for (name, rank), rs in cells.items():
        domain = next((x["domain"] for x in rs if x.get("domain") and x["metric"] != "loss"), name)
        rank_key = rank if rank == FULL else int(rank)
        options.setdefault(name, {})[rank_key] = (params_of(name, rank_key), selection_score(rs, domain))
    return allocate(options, budget)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ValueError(f"--shard {text!r}: allowed I/N with 0 <= I < N, e.g. 0/3")
    return int(i), int(n)


def base_model_dir(model, path: Path, trained_from: Path) -> Path:
    """The base as a model folder, rewritten only when it is another model than the one there (shards share it)."""
    if path.is_dir() and base_hash(load_model(path).state_dict()) == base_hash(model.state_dict()):
        return path
    return save_model_dir(model, path, overwrite=path.exists(), trained_from=trained_from)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexmore-sweep", description=__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--experts", nargs="+", required=True, help="full expert artifact folders")
    ap.add_argument("--max-rank-exp", type=int, default=8, help="ranks 2^0..2^k, capped by the shapes")
    ap.add_argument("--tasks", nargs="*", default=["embedded"])
    ap.add_argument("--n", type=int, default=50, help="items per embedded task")
    ap.add_argument("--val-domains", nargs="*", default=["public", "code", "math", "facts"])
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--budget", type=int, default=None, help="also pick the best mixture within this many expert params")
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--tune-steps", type=int, default=TuneConfig.steps,
                    help="router tuning of every mixture of several experts (0: the merged router as is)")
    ap.add_argument("--refit-steps", type=int, default=REFIT_STEPS,
                    help="re-fit each extracted low-rank expert's router row and bias on its owner's sample and the "
                         "public one, this many steps, before any cell uses it (0: the rows trained with the full "
                         "expert, as FlexMoRE's paper extracts); with --tune-lr, --sample, --max-seqs")
    ap.add_argument("--refit-route-loss", type=float, default=0.0,
                    help="router refit: weight of the routing loss (0: the language-model loss alone, which measured "
                         "better on the expert's own domain; 1.0 keeps more public tokens on the public expert)")
    ap.add_argument("--tune-lr", type=float, default=TuneConfig.lr)
    ap.add_argument("--route-loss", type=float, default=TuneConfig.route_loss,
                    help="router tuning: weight of the routing loss")
    ap.add_argument("--drop", type=float, default=TuneConfig.drop,
                    help="router tuning: probability that an expert is absent from a row (rehearses opt-outs)")
    ap.add_argument("--sample", nargs="*", default=[], metavar="NAME=DATA",
                    help="router tuning and refit: each owner's sample (shard folder or embedded:DOMAIN); default "
                         "the expert's training data (its shard folder or embedded domain), and embedded:public for "
                         "public")
    ap.add_argument("--max-seqs", type=int, default=1024, help="router tuning: sequences per sample")
    ap.add_argument("--route-context", choices=ROUTE_CONTEXTS, default="token",
                    help="the routing rule of every mixture of several experts (after tuning, if --tune-steps > 0): "
                         "token (FlexOlmo's) or another ModelConfig.route_context, e.g. posterior (the README "
                         "workflow's)")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="evaluate only every N-th cell of designs (a) and (b), from the I-th; run N shards at once "
                         "into one --out, then once without --shard for (c) and the report")
    ap.add_argument("--out", required=True)
    ap.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"])
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = ap.parse_args(argv)
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        shard = parse_shard(args.shard)
        for flag, steps in (("--tune-steps", args.tune_steps), ("--refit-steps", args.refit_steps)):
            if steps < 0:
                raise ValueError(f"{flag}={steps} must be >= 0")
        refit_tune = TuneConfig(steps=args.refit_steps, lr=args.tune_lr, route_loss=args.refit_route_loss) \
            if args.refit_steps > 0 else None  # checked before any work
        if args.tune_steps > 0 or args.refit_steps > 0:
            check_max_seqs(args.max_seqs)
        base = check_trusted(args.base, args.trust_checkpoint)
        check_seq_len(args.seq_len, read_config(base).max_seq_len)
        if is_checkpoint(base):  # your own checkpoint, trusted: read once, then as a model folder like any other
            base = base_model_dir(load_model(base, trust_checkpoint=True), out / "base-model", base)
        tasks = build_tasks(args.tasks, args.n)
        tok = load_tokenizer(args.tokenizer)
        val = embedded_val_sets(args.val_domains, tok, args.seq_len, args.val_batches)
        fit = refit = None
        if args.tune_steps > 0 or args.refit_steps > 0:
            specs = {"public": "embedded:public"}
            for p in args.experts:
                man = read_manifest(p)
                specs[man.name] = own_sample_spec(man.domain)
            for item in args.sample:
                name, _, spec = item.partition("=")
                if name not in specs:
                    raise ValueError(f"--sample {item!r}: no expert {name!r}; experts are {sorted(specs)}")
                specs[name] = spec
            samples = {n: load_sample(s, tok, args.seq_len, args.max_seqs) for n, s in specs.items()}
            if args.tune_steps > 0:
                fit = RouterFit(samples, TuneConfig(steps=args.tune_steps, lr=args.tune_lr,
                                                    route_loss=args.route_loss, drop=args.drop))
            if refit_tune is not None:
                refit = RouterFit(samples, refit_tune)
        rows = run_sweep(base, args.experts, args.max_rank_exp, tasks, val, tok, device, out, fit, shard=shard,
                         context=args.route_context, refit=refit)
        if shard is not None:
            print(f"shard {args.shard}: {len(rows)} rows in {out / 'results.jsonl'}; run once without --shard for "
                  "design (c) and the report")
            return 0
        if args.budget:

            full = {read_manifest(p).name: Path(p) for p in args.experts}

            def artifact_of(name, rank) -> Path:
                return full[name] if rank == FULL else lowrank_path(out, name, rank, refit is not None)

            choice, used, value = budget_choice(rows, args.budget,
                                                lambda n, r: read_manifest(artifact_of(n, r)).params)
            store = ResultStore(out / "results.jsonl")
            key = cell_key("alloc", choice, fit, args.route_context, refit is not None)
            if key not in store.done:
                model = build_mixture(base, {n: artifact_of(n, r) for n, r in choice.items()}, fit, device,
                                      args.route_context)
                c = count_params(model)
                store.add(key, evaluate_model(model, tok, tasks, val, device, {
                    "model": key, "design": "alloc", "mixture": "+".join(choice), "ranks": choice, "rank": "mixed",
                    "params": c.total, "active_params": c.active, "budget": args.budget, "expert_params": used,
                    **how_routed(choice, fit, args.route_context, refit is not None)}))
            rows = store.rows
            print(f"budget {args.budget:,}: ranks {choice} use {used:,} expert parameters")
    except (FileNotFoundError, ValueError) as e:
        print(f"flexmore-sweep: error: {e}", file=sys.stderr)
        return 2
    write_table(rows, out / "table")
    analysis = write_report(rows, out, energy_curves(out))
    if args.wandb != "disabled":
        import wandb

        run = wandb.init(project="flexmore", mode=args.wandb, job_type="sweep", config=vars(args))
        run.log({p.stem: wandb.Image(str(p)) for p in out.glob("*.png")})
        run.log({"sweep/table": wandb.Table(columns=sorted(rows[0]), data=[[str(r.get(k)) for k in sorted(rows[0])]
                                                                           for r in rows])})
        run.finish()
    for cat, s in analysis["categories"].items():
        fit = s.get("fit", {})
        print(f"{cat:<12} best rank {s['best_rank']:>6}  slope {fit.get('slope', float('nan')):+.4f}")
    print(f"report: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
