"""A hybrid-sharded run under torchrun: tokens/s, step-time breakdown, bytes per group, peak memory, final loss,
and whether the FlexDeMo replicas are bit-identical at the end. One strategy per invocation:

    torchrun --standalone --nproc_per_node=4 benchmarks/bench_hsdp.py --strategy flexdemo --replicate 2 --shard 2 \\
        --model base --slow-link --out $OUT/flexdemo_slow.json

Breakdown (median ms per step; the phases are separated by device synchronisation, so overlap is removed):
fwd_bwd_compute (probe steps with gradient sync off), fsdp_comm (the same steps with sync on, minus compute: the
intra-node reduce-scatter, plus HSDP's inter-node all-reduce when it runs inside FSDP), replicate_allreduce (HSDP over
the slow link), encode / exchange / decode (FlexDeMo), optimizer (AdamW), step (the whole step as trained).
``--slow-link`` sends the inter-node traffic over a gloo/TCP group through host memory (parallel.replicate_backend);
``--link-gbps G [--link-latency-ms L]`` also caps it (parallel.link_gbps). ``--overlap stale|layerwise``: FlexDeMo's
exchange under compute (optim.demo.overlap), timed as whole steps only. Several ranks on one GPU (R "nodes" of one rank each):

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_hsdp.py --strategy flexdemo --replicate 2 --shard 1 \
        --link-gbps 10 --link-latency-ms 1 --model base
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexdemo import DeMoConfig, FlexDeMo, local_tensor  # noqa: E402
from flexdemo.link import LinkCap  # noqa: E402
from flexmore.config import OptimConfig  # noqa: E402
from flexmore.data import ByteTokenizer, SequenceLoader, TokenStream, embedded_path  # noqa: E402
from flexmore.model import count_params, load_preset  # noqa: E402
from flexmore.parallel import build_parallel_model, init_parallel  # noqa: E402
from flexmore.parallel.parallelize import allreduce_replicas  # noqa: E402
from flexmore.parallel.strategy import get_strategy  # noqa: E402
from flexmore.train.loop import clip_gradients  # noqa: E402
from flexmore.train.optim import LRSchedule, build_optimizer  # noqa: E402


class Clock:
    def __init__(self, device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] * 1e3 if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["adamw", "flexdemo"], required=True)
    ap.add_argument("--model", default="base")
    ap.add_argument("--replicate", type=int, default=2)
    ap.add_argument("--shard", type=int, default=2)
    ap.add_argument("--slow-link", action="store_true")
    ap.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"],
                    help="the main group's (auto: gloo when ranks outnumber GPUs, so several share one with --shard 1)")
    ap.add_argument("--link-gbps", type=float, default=None, help="cap the inter-node link (implies --slow-link)")
    ap.add_argument("--link-latency-ms", type=float, default=0.0)
    ap.add_argument("--overlap", default="off", choices=["off", "stale", "layerwise"],
                    help="FlexDeMo's exchange under compute: one step stale, or per layer before its next forward")
    ap.add_argument("--cuda-graphs", action="store_true", help="FlexDeMo's encode and decode + apply as CUDA graphs")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--probe", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.overlap != "off" and args.strategy != "flexdemo":
        raise SystemExit(f"--overlap with --strategy {args.strategy}: only flexdemo has an exchange to overlap")
    link = LinkCap(args.link_gbps, args.link_latency_ms) if args.link_gbps is not None else None
    args.slow_link = args.slow_link or link is not None
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ctx = init_parallel(args.replicate, args.shard, args.backend, "auto",
                        replicate_backend="gloo" if args.slow_link else "auto")
    dev = ctx.device
    mp = dev.type == "cuda"
    tok = ByteTokenizer()
    cfg = load_preset(args.model)
    cfg = cfg.__class__(**{**cfg.__dict__, "vocab_size": cfg.resolved_vocab(tok.vocab_size)})
    chars = max(2_000_000, args.micro_batch * args.seq_len * ctx.world * (args.steps + args.warmup + args.probe + 2))
    stream = TokenStream([embedded_path("public", "train", tok, chars, 0)])
    loader = SequenceLoader(stream, args.seq_len, args.micro_batch, 1, ctx.rank, ctx.world, seed=0)
    model = build_parallel_model(cfg, ctx, args.strategy, seed=0, mixed_precision=mp)
    # AdamW at its best rate at `small`, FlexDeMo's default update at 2e-3 (its best there on 2026-12-05; 4e-3 by
    # 0.004 on 2026-12-06, benchmarks/results/parity), with AdamW's decay
    ocfg = OptimConfig(name=args.strategy, lr=args.lr or (1e-3 if args.strategy == "adamw" else 2e-3),
                       weight_decay=0.1, warmup_steps=args.warmup,
                       demo=DeMoConfig(topk=args.topk, chunk=args.chunk, overlap=args.overlap,
                                       cuda_graphs=args.cuda_graphs))
    opt = build_optimizer(model, ocfg, dev, ctx.replicate_group, link=link)
    sched = LRSchedule(ocfg, args.steps + args.warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    clock = Clock(dev)
    times: dict[str, list[float]] = {k: [] for k in ("step", "fwd_bwd", "replicate_allreduce", "encode", "exchange",
                                                     "decode", "optimizer", "fwd_bwd_nosync")}
    losses = []

    # FSDP's switch; a model without FSDP (a shard group of one rank) has no intra-node reduction to switch off
    set_gradient_sync = getattr(model, "set_requires_gradient_sync", lambda sync: None)

    def fwd_bwd(sync: bool) -> torch.Tensor:
        x, y = loader.next_step()[0]
        set_gradient_sync(sync)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mp):
            out = model(x.to(dev), y.to(dev))
        out.loss.backward()
        return out.ce_loss.detach()

    for step in range(args.warmup + args.steps):
        record = step >= args.warmup
        LRSchedule.apply(opt, sched(step))
        t0 = clock()
        loss = fwd_bwd(True)
        t1 = clock()
        if args.strategy == "adamw" and ctx.slow_replicate is not None:
            allreduce_replicas(params, ctx.slow_replicate, link)
        t2 = clock()
        clip_gradients(params, 1.0)
        if isinstance(opt, FlexDeMo) and args.overlap == "off":
            a = clock()
            payload = opt.encode()
            b = clock()
            gathered = opt.exchange(payload)
            c = clock()
            opt.decode_apply(gathered)
            d = clock()
            if record:
                times["encode"].append(b - a)
                times["exchange"].append(c - b)
                times["decode"].append(d - c)
            opt.last_comm = opt.comm_bytes()
        else:
            a = clock()
            opt.step()
            if record:
                times["optimizer"].append(clock() - a)
        opt.zero_grad(set_to_none=True)
        t3 = clock()
        if record:
            times["step"].append(t3 - t0)
            times["fwd_bwd"].append(t1 - t0)
            times["replicate_allreduce"].append(t2 - t1)
            losses.append(loss.float().item())
    for _ in range(args.probe):  # compute only: no gradient reduction (the gradients are discarded)
        t0 = clock()
        fwd_bwd(False)
        times["fwd_bwd_nosync"].append(clock() - t0)
        opt.zero_grad(set_to_none=True)
    set_gradient_sync(True)
    if isinstance(opt, FlexDeMo):
        opt.flush()  # the update still in flight (overlap), so the replicas' hashes compare every update

    counts = count_params(model)
    tokens_per_step = args.micro_batch * args.seq_len * ctx.world
    comm = get_strategy(args.strategy).comm_per_step(counts.total, ctx.replicate, ctx.shard, 2 if mp else 4, 4, True,
                         getattr(opt, "last_comm", None))
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if mp else 0.0], device=dev)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    final = torch.tensor([sum(losses[-5:]) / len(losses[-5:])], device=dev)
    dist.all_reduce(final)
    digest = hashlib.sha256(b"".join(local_tensor(p).detach().float().cpu().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()
    hashes = [None] * ctx.world
    dist.all_gather_object(hashes, digest)
    same = all(hashes[r] == hashes[r % ctx.shard] for r in range(ctx.world))
    fb, nosync = median(times["fwd_bwd"]), median(times["fwd_bwd_nosync"])
    res = {"strategy": args.strategy, "slow_link": args.slow_link, "link_gbps": args.link_gbps,
           "link_latency_ms": args.link_latency_ms if link else None, "overlap": args.overlap,
           "link_achieved_gbps": link.achieved_gbps if link else None, "model": args.model, "params": counts.total,
           "replicate": ctx.replicate, "shard": ctx.shard, "device": torch.cuda.get_device_name() if mp else "cpu",
           "date": time.strftime("%Y-%m-%d"), "tokens_per_s": tokens_per_step / (median(times["step"]) / 1e3),
           "ms": {"step": median(times["step"]), "fwd_bwd_compute": nosync, "fsdp_comm": fb - nosync,
                  "replicate_allreduce": median(times["replicate_allreduce"]), "encode": median(times["encode"]),
                  "exchange": median(times["exchange"]), "decode": median(times["decode"]),
                  "optimizer": median(times["optimizer"])},
           "bytes": comm, "peak_mem_GiB": peak.item(), "final_loss": final.item() / ctx.world,
           "replicas_bit_identical": same, "param_hashes": hashes}
    if ctx.rank == 0:
        print(json.dumps(res, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
