"""FlexDeMo against HSDP AdamW over an inter-node link of chosen bandwidth: one `bench_hsdp.py` run per (strategy,
link, overlap), then the table of tokens/s ratios beside a bound computed from the same runs' phase times and bytes.

R "nodes" of one rank each share one GPU (the process groups on gloo, picked by parallel.backend=auto; no FSDP in a
shard group of one rank), so the comparison runs on a single GPU; on a CPU it runs at `tiny` (the test suite does). The link is emulated
(`parallel.link_gbps`: each inter-node collective lasts at least latency + bytes / bandwidth).

    python benchmarks/bench_slow_link.py --model base --links uncapped 10 1 --out $OUT/slow_link     # one GPU

Bound, per link: AdamW's step = compute + optimizer + its all-reduce over the link; FlexDeMo's = compute + encode +
decode + its all-gather over the link (no overlap), with compute and kernels from the uncapped runs and bytes from
the runs themselves. Writes summary.json (`rows`: one per strategy, link and overlap; `ratios`: per link) and table.md.
Resumable: a row whose JSON exists is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from flexdemo.link import LinkCap  # noqa: E402

OVERLAP_SUFFIX = {"off": "", "stale": "-overlap", "layerwise": "-layerwise"}


def row_name(strategy: str, link: str, overlap: str) -> str:
    return f"{strategy}-{link}{OVERLAP_SUFFIX[overlap]}"


def bound(rows: dict, gbps: float, latency_ms: float, R: int) -> float | None:
    """Predicted tokens/s FlexDeMo / AdamW at this link, from the uncapped runs (no overlap)."""
    a, f = rows.get(row_name("adamw", "uncapped", "off")), rows.get(row_name("flexdemo", "uncapped", "off"))
    if a is None or f is None:
        return None
    ms_a, ms_f, link = a["ms"], f["ms"], LinkCap(gbps, latency_ms)  # the time the emulation holds a collective for
    t_a = (ms_a["fwd_bwd_compute"] + ms_a["optimizer"]) / 1e3 + link.seconds_for(
        a["bytes"]["comm/replicate_sent_bytes"], 2 * (R - 1))
    t_f = (ms_f["fwd_bwd_compute"] + ms_f["encode"] + ms_f["decode"]) / 1e3 + link.seconds_for(
        f["bytes"]["comm/replicate_sent_bytes"], R - 1)
    return t_a / t_f


def summarize(rows: dict, links: list[str], latency_ms: float, R: int, overlaps: list[str]) -> dict:
    table = []
    for name, r in rows.items():
        table.append({"name": name, "strategy": r["strategy"], "link_gbps": r["link_gbps"], "overlap": r["overlap"],
                      "tokens_per_s": r["tokens_per_s"], "step_ms": r["ms"]["step"],
                      "inter_node_bytes_per_step": r["bytes"]["comm/replicate_sent_bytes"],
                      "final_loss": r["final_loss"], "replicas_bit_identical": r["replicas_bit_identical"],
                      "link_achieved_gbps": r.get("link_achieved_gbps"), "ms": r["ms"]})
    ratios = {}
    # losses over the same tokens: the link changes no number, and AdamW runs fewer steps on the slowest links
    a_loss = rows.get(row_name("adamw", "uncapped", "off"))
    for link in links:
        a = rows.get(row_name("adamw", link, "off"))
        if a is None:
            continue
        for overlap in ["off", *overlaps]:
            f = rows.get(row_name("flexdemo", link, overlap))
            if f is None:
                continue
            ratios[row_name("flexdemo", link, overlap)] = {
                "tokens_per_s_ratio": f["tokens_per_s"] / a["tokens_per_s"],
                "final_loss_ratio": f["final_loss"] / a_loss["final_loss"] if a_loss else None,
                "bound": None if link == "uncapped" else bound(rows, float(link), latency_ms, R)}
    hidden = {}
    for overlap in overlaps:
        for link in links:
            f, g = rows.get(row_name("flexdemo", link, overlap)), rows.get(row_name("flexdemo", "uncapped", overlap))
            if link != "uncapped" and f and g:  # the overlap goal: the capped step within 5% of the uncapped one
                hidden.setdefault(overlap, {})[link] = f["ms"]["step"] / g["ms"]["step"]
    return {"rows": table, "ratios": ratios, "overlap_step_vs_uncapped": hidden}


def write_table(summary: dict, path: Path) -> None:
    lines = ["| run | link Gbit/s | overlap | tokens/s | step ms | inter-node MB/step | final loss | replicas equal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['name']} | {r['link_gbps'] or 'uncapped'} | {r['overlap']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_ms']:.1f} | {r['inter_node_bytes_per_step'] / 1e6:.2f} | {r['final_loss']:.4f} | "
                     f"{r['replicas_bit_identical']} |")
    lines += ["", "| FlexDeMo run | tokens/s over AdamW's (same link) | bound | final training loss over AdamW's (same "
              "tokens) |", "|---|---|---|---|"]
    for name, q in summary["ratios"].items():
        b = "—" if q["bound"] is None else f"{q['bound']:.2f}×"
        loss = "—" if q["final_loss_ratio"] is None else f"{q['final_loss_ratio']:.4f}"
        lines.append(f"| {name} | {q['tokens_per_s_ratio']:.2f}× | {b} | {loss} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--replicate", type=int, default=2)
    ap.add_argument("--links", nargs="+", default=["uncapped", "10", "1"], help="Gbit/s, or 'uncapped' (gloo)")
    ap.add_argument("--latency-ms", type=float, default=1.0)
    ap.add_argument("--overlaps", nargs="*", default=["stale", "layerwise"], choices=["stale", "layerwise"],
                    help="FlexDeMo's overlapped rows (none: --overlaps with no value)")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                    help="the main group's (auto: gloo when the R ranks share fewer GPUs, else NCCL)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--slow-steps", type=int, default=8, help="AdamW's steps on links under 5 Gbit/s (seconds each)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--budget", type=float, default=None, help="seconds: start no run after this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for link in args.links:
        if link != "uncapped" and not (link.replace(".", "", 1).isdigit() and float(link) > 0):
            raise SystemExit(f"--links {link!r}: allowed a bandwidth in Gbit/s > 0, or 'uncapped'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = [(s, link, "off") for link in args.links for s in ("adamw", "flexdemo")]
    plan += [("flexdemo", link, o) for o in args.overlaps for link in args.links]
    rows = {}
    for strategy, link, overlap in plan:
        name = row_name(strategy, link, overlap)
        res = out / f"{name}.json"
        if not res.is_file():
            if args.budget is not None and time.perf_counter() - t0 > args.budget:
                print(f"{name}: not run (budget)")
                continue
            slow = link != "uncapped" and float(link) < 5 and strategy == "adamw"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.replicate}",
                   str(HERE / "bench_hsdp.py"), "--strategy", strategy, "--replicate", str(args.replicate),
                   "--shard", "1", "--backend", args.backend, "--model", args.model,
                   "--steps", str(args.slow_steps if slow else args.steps), "--warmup", str(args.warmup),
                   "--probe", "2", "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
                   "--chunk", str(args.chunk), "--topk", str(args.topk), "--out", str(res)]
            cmd += ["--slow-link"] if link == "uncapped" else ["--link-gbps", link, "--link-latency-ms",
                                                               str(args.latency_ms)]
            cmd += ["--overlap", overlap]
            with open(out / f"{name}.log", "w") as log:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
            if done.returncode != 0:
                print(f"{name}: failed (rc {done.returncode}), see {out / (name + '.log')}", file=sys.stderr)
                continue
        rows[name] = r = json.loads(res.read_text())
        if isinstance(r["overlap"], bool):  # a row written when the only overlap was the stale one
            r["overlap"] = "stale" if r["overlap"] else "off"
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, step {r['ms']['step']:.1f} ms, loss {r['final_loss']:.4f}",
              flush=True)
    summary = summarize(rows, args.links, args.latency_ms, args.replicate, args.overlaps)
    first = next(iter(rows.values()), {})
    summary.update({"model": args.model, "replicate": args.replicate, "latency_ms": args.latency_ms,
                    "steps": args.steps, "device": first.get("device"), "date": time.strftime("%Y-%m-%d"),
                    "command": " ".join(["python benchmarks/bench_slow_link.py", *sys.argv[1:]])})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_table(summary, out / "table.md")
    print((out / "table.md").read_text())
    return 0 if len(rows) == len(plan) else 1


if __name__ == "__main__":
    sys.exit(main())
