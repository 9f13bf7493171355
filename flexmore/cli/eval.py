"""`flexmore-eval`: validation loss per domain and task scores of one model, as a tidy CSV/JSON table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flexmore.cli import TRUST_HELP
from flexmore.data import load_tokenizer
from flexmore.eval.evaluate import evaluate_model
from flexmore.eval.routing import plot_routing, routing_mass, routing_stats
from flexmore.eval.table import write_table
from flexmore.eval.tasks import build_tasks, embedded_val_sets
from flexmore.model import count_params
from flexmore.store.modeldir import load_model, trained_info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexmore-eval", description=__doc__)
    ap.add_argument("--model", required=True, help="model folder, or run folder (its model folder)")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ap.add_argument("--tasks", nargs="*", default=["embedded"],
                    help="'embedded' (math_qa, facts_qa, math_mc, facts_mc) and/or path.jsonl:name:category[:domain]")
    ap.add_argument("--n", type=int, default=100, help="items per embedded task")
    ap.add_argument("--val-domains", nargs="*", default=["public", "code", "math", "facts"])
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None,
                    help="default: the length the model was trained at (recorded in its folder); else 256, or the "
                         "model's max_seq_len if smaller")
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="table path (writes .csv and .json)")
    ap.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"])
    args = ap.parse_args(argv)
    try:
        tasks = build_tasks(args.tasks, args.n)
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(args.device)
        model = load_model(args.model, device=device, trust_checkpoint=args.trust_checkpoint)
        tok = load_tokenizer(args.tokenizer)
        if args.seq_len is None:
            trained = trained_info(args.model).get("seq_len")
            args.seq_len = trained or min(256, model.cfg.max_seq_len)
            print(f"validation at seq_len {args.seq_len}: " + ("the length the model was trained at" if trained else
                  "its training length is not recorded in the folder; pass --seq-len to choose"))
        if args.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"--seq-len {args.seq_len} is beyond the model's max_seq_len={model.cfg.max_seq_len}")
        val = embedded_val_sets(args.val_domains, tok, args.seq_len, args.val_batches)
    except (FileNotFoundError, ValueError) as e:
        print(f"flexmore-eval: error: {e}", file=sys.stderr)
        return 2
    c = count_params(model)
    labels = {"model": str(args.model), "mixture": ",".join(model.cfg.expert_names or ["public"]),
              "params": c.total, "active_params": c.active}
    rows = evaluate_model(model, tok, tasks, val, device, labels)
    csv_path, _ = write_table(rows, args.out)
    routing = routing_stats(model, val, device)
    if routing:  # a mixture: where each domain's tokens go
        out = Path(args.out)
        write_table([{**labels, **r} for r in routing], out.with_name(out.stem + "_routing"))
        print("router probability (mean over layers), domain x expert:")
        for domain, mass in routing_mass(routing).items():
            print(f"  {domain:<10}" + " ".join(f"{e}={p:.3f}" for e, p in mass.items()))
        try:
            print(f"wrote {plot_routing(routing, out.with_name(out.stem + '_routing.png'))}")
        except ImportError:
            print("(matplotlib not installed: no routing heat-map; pip install 'flexmore[report]')")
    if args.wandb != "disabled":
        import wandb

        run = wandb.init(project="flexmore", mode=args.wandb, job_type="eval", config=vars(args))
        run.log({f"eval/{r['task']}/{r['metric']}": r["score"] for r in rows})
        run.log({"eval/table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.finish()
    for r in rows:
        print(f"{r['task']:<20}{r['metric']:<12}{r['score']:.4f}")
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
