"""FlexDeMo with the Triton kernels against the torch path, end to end on one GPU (a check, not a timing):

1. the same short training run (embedded data, same seed) with ``optim.demo.kernels=torch`` twice and ``triton`` once:
   the loss curves, and how far triton's is from torch's next to how far torch's is from itself (the run-to-run
   noise; zero on the H100 of benchmarks/HISTORY.md), and ``triton`` with ``cuda_graphs`` (the same bits as
   triton's wherever the run itself repeats bit for bit);
2. two simulated replicas (separate optimizers, different gradients, one exchange per step) on real-sized tensors for
   many steps: their parameters must stay bit-identical.

    python benchmarks/check_triton_e2e.py --out $OUT/e2e.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexdemo import DeMoConfig, FlexDeMo  # noqa: E402
from flexmore.config import Config, DataConfig, LoggingConfig, OptimConfig, TrainConfig  # noqa: E402
from flexmore.model import load_preset  # noqa: E402
from flexmore.train.loop import train  # noqa: E402


def loss_curve(kernels: str, model: str, steps: int, work: Path, cuda_graphs: bool = False) -> dict[int, float]:
    cfg = Config(model=load_preset(model), data=DataConfig(train_chars=4_000_000),
                 optim=OptimConfig(name="demo", lr=3e-4, warmup_steps=10,
                                   demo=DeMoConfig(kernels=kernels, cuda_graphs=cuda_graphs)),
                 train=TrainConfig(steps=steps, seq_len=256, micro_batch=16, eval_every=0, log_every=10,
                                   progress=False, resume="never"),
                 logging=LoggingConfig(mode="disabled"), run_dir=str(work / kernels / str(time.time_ns())))
    res = train(cfg)
    assert res.optimizer.kernels == kernels, res.optimizer.kernels
    return res.losses


def replicas_identical(steps: int, replicas: int = 2) -> dict:
    torch.manual_seed(0)
    shapes = [(4096, 1024), (1024, 4096), (3000, 700), (4096,)]
    init = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    reps = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(replicas)]
    opts = [FlexDeMo(ps, lr=1e-3, kernels="triton", weight_decay=0.1) for ps in reps]
    for _ in range(steps):
        for ps in reps:
            for p in ps:
                p.grad = torch.randn_like(p) * 1e-3
        gathered = torch.stack([o.encode() for o in opts])
        for o in opts:
            o.decode_apply(gathered)
    same = all(torch.equal(p, q) for r in range(1, replicas) for p, q in zip(reps[0], reps[r]))
    moved = max((p - t).abs().max().item() for p, t in zip(reps[0], init))
    deltas_differ = any(not torch.equal(opts[0].state[p]["delta"], opts[1].state[q]["delta"])
                        for p, q in zip(reps[0], reps[1]))
    return {"steps": steps, "replicas": replicas, "params_bit_identical": same, "residuals_differ": deltas_differ,
            "max_param_change": moved}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--replica-steps", type=int, default=200)
    ap.add_argument("--work", default="/tmp/flexdemo-e2e")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    curves = {"torch": loss_curve("torch", args.model, args.steps, work),
              "torch again": loss_curve("torch", args.model, args.steps, work),
              "triton": loss_curve("triton", args.model, args.steps, work),
              "triton graphs": loss_curve("triton", args.model, args.steps, work, cuda_graphs=True)}

    def max_rel(a: str, b: str) -> float:
        return max(abs(curves[a][s] - curves[b][s]) / abs(curves[a][s]) for s in curves[a])

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "model": args.model, "steps": args.steps, "curves": {k: {str(s): v for s, v in c.items()} for k, c in curves.items()},
           "max_rel_diff_torch_vs_torch": max_rel("torch", "torch again"),
           "max_rel_diff_triton_vs_torch": max_rel("torch", "triton"),
           "max_rel_diff_graphs_vs_triton": max_rel("triton", "triton graphs"),
           "replicas": replicas_identical(args.replica_steps)}
    print(json.dumps({k: v for k, v in out.items() if k != "curves"}))
    print(f"{'step':>6}" + "".join(f"{k:>14}" for k in curves))
    for s in curves["torch"]:
        print(f"{s:>6}" + "".join(f"{c[s]:>14.5f}" for c in curves.values()))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
