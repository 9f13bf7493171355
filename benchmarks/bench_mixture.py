"""Merged FlexMoRE mixtures: does each remedy keep every expert's gain and the public model's quality?

A public base, then experts for math, facts and code trained alone against it under each recipe (flexmore.study.mixture:
FlexOlmo's as before, the working bias, public negatives and their combinations); per recipe the merged mixture as is,
with its router tuned on a small proxy mix, the nearest-centroid router and the oracle, and the merged mixture routed
by posterior (the README workflow's; ``--routings`` names the rules evaluated). Writes summary.json (keys base,
alone, mixtures, default) and table.md.

    python benchmarks/bench_mixture.py --size small --out $OUT/mixture     # GPU (recipes trained in parallel)
    python benchmarks/bench_mixture.py --size tiny --out outputs/mixture_tiny   # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexmore.study import mixture  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(mixture.SIZES), default="small")
    ap.add_argument("--recipes", nargs="+", default=list(mixture.RECIPES), choices=list(mixture.RECIPES))
    ap.add_argument("--domains", nargs="+", default=["math", "facts", "code"])
    ap.add_argument("--default", default="negatives+route+bias/merged@posterior",
                    help="the mixture the README's workflow makes")
    ap.add_argument("--centroid-for", default="negatives+route+bias")
    ap.add_argument("--work", default="outputs/bench-mixture")
    ap.add_argument("--out", default="outputs/bench-mixture/results")
    ap.add_argument("--parallel", type=int, default=0, help="train this many recipes at once in subprocesses "
                                                           "(default: all on a GPU, 1 on a CPU)")
    ap.add_argument("--train-only", default=None, help=argparse.SUPPRESS)  # a worker: one recipe's experts
    ap.add_argument("--no-tasks", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="override Size fields, e.g. expert_steps=300")
    ap.add_argument("--tune", nargs="*", default=None, metavar="NAME=ROUTE_LOSS:STEPS_FACTOR[:DROP]",
                    help="router tunings to compare (default: tuned=0:1 tuned+route=1:1 tuned+route+drop=1:1:0.25); DROP: probability that an "
                         "expert is absent from a tuning row")
    ap.add_argument("--routings", nargs="*", default=["posterior"], metavar="NAME",
                    help=f"also evaluate the merged and each tuned mixture with these routings ({', '.join(mixture.ROUTINGS)}: "
                         "top-k with renormalised weights; prefix / sequence: the public expert and the one its "
                         "sequence so far prefers, per layer / over all layers; likelihood: the two-expert model "
                         "that predicted the sequence so far best; posterior: every two-expert model, weighted by its "
                         "likelihood of the sequence so far)")
    args = ap.parse_args()
    unknown = [r for r in args.routings if r not in mixture.ROUTINGS]
    if unknown:
        raise SystemExit(f"--routings {unknown}: allowed {', '.join(mixture.ROUTINGS)}")
    rule = args.default.partition("@")[2]
    if rule and rule not in args.routings:
        raise SystemExit(f"--default {args.default!r} is routed by {rule!r}, which --routings {args.routings} does "
                         f"not evaluate: add it to --routings")
    size = mixture.SIZES[args.size]
    for kv in args.set:
        k, v = kv.split("=")
        size = dataclasses.replace(size, **{k: type(getattr(size, k))(v)})
    work = Path(args.work) / args.size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.train_only:
        mixture.train_experts(size, work / "base", mixture.RECIPES[args.train_only], args.domains, work)
        return
    t0 = time.perf_counter()
    mixture.train_base(size, work)
    print(f"base: {time.perf_counter() - t0:.0f}s", flush=True)
    parallel = args.parallel or (len(args.recipes) if device.type == "cuda" else 1)
    if parallel > 1:
        mixture.prepare_data(size, args.domains)  # once, before the workers that read it start
        pending = list(args.recipes)
        running = []
        while pending or running:
            while pending and len(running) < parallel:
                r = pending.pop(0)
                cmd = [sys.executable, __file__, "--size", args.size, "--work", args.work, "--train-only", r,
                       "--domains", *args.domains, "--set", *args.set]
                log = open(Path(args.work) / f"train-{args.size}-{r.replace('+', '_')}.log", "w")
                running.append((r, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)))
            time.sleep(2)
            for r, p in list(running):
                if p.poll() is not None:
                    running.remove((r, p))
                    if p.returncode != 0:
                        raise SystemExit(f"training recipe {r} failed (rc {p.returncode}); see {args.work}")
        print(f"experts: {time.perf_counter() - t0:.0f}s", flush=True)
    out = Path(args.out)
    tunings = mixture.TUNINGS
    if args.tune is not None:
        tunings = {}
        for t in args.tune:
            name, spec = t.split("=")
            vals = [float(v) for v in spec.split(":")]
            if len(vals) not in (2, 3):
                raise SystemExit(f"--tune {t!r}: want NAME=ROUTE_LOSS:STEPS_FACTOR[:DROP]")
            tunings[name] = (*vals, 0.0)[:3]
    summary = mixture.run(size, [mixture.RECIPES[r] for r in args.recipes], args.domains, work, device,
                          default=args.default, tasks=not args.no_tasks, centroid_for=args.centroid_for,
                          out=out / "summary.json", tunings=tunings,
                          routings={r: mixture.ROUTINGS[r] for r in args.routings})
    summary["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    summary["torch"] = torch.__version__
    summary["wall_s"] = time.perf_counter() - t0
    mixture.write_summary(summary, out / "summary.json")
    (out / "table.md").write_text(mixture.table(summary) + "\n")
    print(mixture.table(summary))
    print(f"wrote {out / 'summary.json'} ({summary['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
