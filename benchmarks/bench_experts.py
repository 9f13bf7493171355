"""FlexMoRE on the embedded data: a public base, then full and low-rank (r = 64; 8 at tiny size) experts for math and facts, each
trained alone against the frozen base; reports per-domain validation loss of the base, of each [public + expert]
mixture and of merged models, with trainable parameters and training throughput.

    python benchmarks/bench_experts.py --size small --out $OUT/experts.json     # GPU, a few minutes
    python benchmarks/bench_experts.py --size tiny                               # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexmore.config import Config, DataConfig, LoggingConfig, OptimConfig, TrainConfig  # noqa: E402
from flexmore.data import ByteTokenizer, TokenStream, embedded_path, eval_batches  # noqa: E402
from flexmore.eval.validation import evaluate  # noqa: E402
from flexmore.experts.merge import merge  # noqa: E402
from flexmore.experts.training import train_expert  # noqa: E402
from flexmore.model import count_params, load_preset  # noqa: E402
from flexmore.train.loop import train  # noqa: E402

SIZES = {  # model, base steps, expert steps, seq_len, micro_batch, train chars per domain, eval batches, rank
    "tiny": ("tiny", 60, 30, 64, 8, 400_000, 4, 8),  # tiny's break-even rank is 48: r = 64 would be a dense delta
    "small": ("small", 1500, 500, 512, 32, 48_000_000, 16, 64),
}
DOMAINS = ("public", "math", "facts")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--work", default="/tmp/flexmore-bench-experts")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each run: faster steps, but ~1 minute of compiling per run outweighs it here")
    args = ap.parse_args()
    model, base_steps, exp_steps, T, B, chars, n_eval, rank = SIZES[args.size]
    work = Path(args.work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = ByteTokenizer()
    val = {d: eval_batches(TokenStream([embedded_path(d, "val", tok, 400_000, 0)]), T, B, n_eval) for d in DOMAINS}

    def losses(m) -> dict:
        return evaluate(m.to(device), val, device, "auto")

    base_cfg = Config(model=load_preset(model), data=DataConfig(train_chars=chars, val_domains=["public"]),
                      optim=OptimConfig(lr=1e-3, warmup_steps=50),
                      train=TrainConfig(steps=base_steps, seq_len=T, micro_batch=B, eval_every=0, progress=False,
                                        compile=args.compile),
                      logging=LoggingConfig(mode="disabled"), run_dir=str(work / "base"))
    t0 = time.perf_counter()
    base_res = train(base_cfg)
    rows = [{"model": "base", "trainable_M": count_params(base_res.model).trainable / 1e6,
             "train_s": time.perf_counter() - t0, **losses(base_res.model)}]
    arts = {}
    for domain in ("math", "facts"):
        for kind in ("full", "lowrank"):
            name = f"{domain}-{kind}"
            cfg = Config(model=load_preset(model), data=DataConfig(domains=[domain], train_chars=chars,
                                                                   val_domains=[domain]),
                         optim=OptimConfig(lr=9e-4, weight_decay=0.0, warmup_steps=20),
                         train=TrainConfig(steps=exp_steps, seq_len=T, micro_batch=B, eval_every=0, progress=False,
                                           compile=args.compile),
                         logging=LoggingConfig(mode="disabled"), run_dir=str(work / name))
            cfg.expert.base, cfg.expert.name, cfg.expert.kind, cfg.expert.ranks = str(work / "base"), name, kind, [rank]
            t0 = time.perf_counter()
            res = train_expert(cfg)
            secs = time.perf_counter() - t0
            arts[name] = res.artifact
            rows.append({"model": f"public + {name}", "trainable_M": count_params(res.model).trainable / 1e6,
                         "train_s": secs, "tokens_per_s": exp_steps * B * T / secs, **losses(res.model)})
    for combo in (("math-full", "facts-full"), ("math-lowrank", "facts-lowrank"), ("math-full", "facts-lowrank")):
        m = merge(work / "base", [arts[c] for c in combo])
        c = count_params(m)
        rows.append({"model": "merged " + " + ".join(combo), "params_M": c.total / 1e6, **losses(m)})
    head = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "size": args.size, "base_steps": base_steps, "expert_steps": exp_steps,
            "batch": f"{B}x{T}", "compile": args.compile}
    print(json.dumps(head))
    print(f"{'model':<40}{'trainable/params M':>20}{'public':>9}{'math':>9}{'facts':>9}")
    for r in rows:
        p = r.get("trainable_M", r.get("params_M", float("nan")))
        print(f"{r['model']:<40}{p:>20.3f}{r['public']:>9.4f}{r['math']:>9.4f}{r['facts']:>9.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
