"""Bytes per optimizer step on the replicate (inter-node) group: FlexDeMo's packed payload vs HSDP AdamW.

Computed from the real payload layout of each rank's local shard (the same `plan_params` the optimizer uses), for a
model preset and several shard degrees. No GPU needed; run it anywhere.

    python benchmarks/bench_demo_comm.py --model base --replicate 2 --shards 1 2 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexdemo import DeMoConfig  # noqa: E402
from flexdemo.optimizer import plan_params  # noqa: E402
from flexmore.model import build_model, load_preset  # noqa: E402


def local_shapes(model, shard: int, rank: int) -> list[torch.Size]:
    """FSDP2's Shard(0) of each parameter on shard rank ``rank`` (torch.chunk semantics)."""
    out = []
    for p in model.parameters():
        rows = p.shape[0]
        per = -(-rows // shard)
        mine = max(0, min(per, rows - rank * per))
        out.append(torch.Size([mine, *p.shape[1:]]))
    return out


def comm_row(model, demo: DeMoConfig, R: int, S: int) -> dict:
    """Bytes per step across nodes for R nodes of S shards: every shard rank has its own payload; the largest is
    reported (the slowest link sets the pace)."""
    N = sum(p.numel() for p in model.parameters())
    payloads = [plan_params(local_shapes(model, S, r), demo)[1] for r in range(S)]
    wire = max(payloads, key=lambda w: w.nbytes)
    shard_numel = -(-N // S)
    flex = (R - 1) * wire.nbytes  # ring all-gather: R - 1 payloads
    hsdp_fp32 = 2 * (R - 1) / R * shard_numel * 4  # HSDP all-reduce of the fp32 gradient shard
    dense_bf16 = 2 * (R - 1) / R * shard_numel * 2  # the same in bf16
    return {"shard": S, "params_per_rank": shard_numel, "coeffs_sparse": wire.num_sparse,
            "values_dense": wire.num_dense, "payload_bytes": wire.nbytes, "flexdemo_bytes": flex,
            "hsdp_fp32_bytes": hsdp_fp32, "dense_bf16_bytes": dense_bf16,
            "ratio_vs_hsdp_fp32": hsdp_fp32 / flex, "ratio_vs_dense_bf16": dense_bf16 / flex,
            "bytes_per_coeff": (wire.nbytes - wire.num_dense * wire._item) / max(1, wire.num_sparse)}


@functools.lru_cache(maxsize=None)  # shapes only (meta): one build per preset serves every settings compared
def meta_model(name: str, vocab: int = 259):
    cfg = load_preset(name)
    return build_model(dataclasses.replace(cfg, vocab_size=cfg.resolved_vocab(vocab)), device="meta")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="base")
    ap.add_argument("--vocab", type=int, default=259, help="tokenizer vocabulary (byte: 259)")
    ap.add_argument("--replicate", type=int, default=2)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--value-dtype", default="bf16")
    ap.add_argument("--index-bits", type=int, default=0)
    wire = DeMoConfig()  # the default wire unless told otherwise
    ap.add_argument("--index-coding", default=wire.index_coding, help="elias_fano or fixed (--index-bits each)")
    ap.add_argument("--value-bits", type=int, default=wire.value_bits,
                    help="1 / 2 / 4 / 8: quantised values (0: --value-dtype)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = meta_model(args.model, args.vocab)
    demo = DeMoConfig(topk=args.topk, chunk=args.chunk, value_dtype=args.value_dtype, index_bits=args.index_bits,
                      value_bits=args.value_bits, index_coding=args.index_coding)
    R = args.replicate
    N = sum(p.numel() for p in model.parameters())
    rows = [comm_row(model, demo, R, S) for S in args.shards]
    # a count of the payload's layout: no device runs it
    head = {"device": "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python " + " ".join(sys.argv), "model": args.model, "params": N, "replicate": R,
            **dataclasses.asdict(demo)}
    print(json.dumps(head))
    print(f"{'shard':>5}{'params/rank':>13}{'payload MB':>12}{'FlexDeMo MB':>13}{'HSDP fp32 MB':>14}{'dense bf16 MB':>15}"
          f"{'x vs fp32':>11}{'x vs bf16':>11}{'B/coef':>8}")
    for r in rows:
        print(f"{r['shard']:>5}{r['params_per_rank']:>13,}{r['payload_bytes'] / 1e6:>12.3f}{r['flexdemo_bytes'] / 1e6:>13.3f}"
              f"{r['hsdp_fp32_bytes'] / 1e6:>14.2f}{r['dense_bf16_bytes'] / 1e6:>15.2f}{r['ratio_vs_hsdp_fp32']:>11.1f}"
              f"{r['ratio_vs_dense_bf16']:>11.1f}{r['bytes_per_coeff']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
