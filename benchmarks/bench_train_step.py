"""Throughput of one training step (forward + backward + the optimizer) for the model presets, on one GPU.

Reports tokens/s, achieved TFLOP/s (6N + attention, see flexmore.model.params) and MFU against both the datasheet
dense-bf16 peak and the bf16 matmul rate measured in the same run (the practical ceiling). Random tokens: this
measures the step, not the data pipeline. The optimizer (``--optims``): fused AdamW, FlexDeMo (one replica: its
encode and decode + apply, no exchange), or FlexDeMo with ``cuda_graphs`` (what replaying its phases saves in a whole
step).

    python benchmarks/bench_train_step.py --models small base --compile both --out results.json
    python benchmarks/bench_train_step.py --models small base --compile on --optims adamw flexdemo flexdemo-graphs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexdemo import DeMoConfig  # noqa: E402
from flexmore.config import OptimConfig  # noqa: E402
from flexmore.model import build_model, count_params, flops_per_token, load_preset  # noqa: E402
from flexmore.train.optim import build_optimizer  # noqa: E402
from flexmore.train.perf import peak_flops  # noqa: E402

CASES = {  # name -> (preset, overrides, micro_batch, seq_len)
    "small": ("small", {}, 32, 1024),
    "small-moe2": ("small", {"num_experts": 2, "top_k": 2}, 32, 1024),
    "base": ("base", {}, 16, 2048),
}


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


OPTIMS = {"adamw": OptimConfig(lr=1e-4), "flexdemo": OptimConfig(name="flexdemo", lr=1e-4),
          "flexdemo-graphs": OptimConfig(name="flexdemo", lr=1e-4, demo=DeMoConfig(cuda_graphs=True))}


def bench(case: str, compile_model: bool, steps: int, warmup: int, optim: str = "adamw") -> dict:
    preset, overrides, mb, T = CASES[case]
    cfg = load_preset(preset, **overrides)
    cfg = dataclasses.replace(cfg, vocab_size=cfg.resolved_vocab(259))
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda")
    opt = build_optimizer(model, OPTIMS[optim], torch.device("cuda"))
    fwd = torch.compile(model) if compile_model else model
    x = torch.randint(0, 256, (mb, T + 1), device="cuda")
    inp, lab = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(inp, lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        loss = step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    t = times[len(times) // 2]
    tok_s = mb * T / t
    fpt = flops_per_token(model, T)
    counts = count_params(model)
    return {"case": case, "compile": compile_model, "optim": optim, "params_M": counts.total / 1e6,
            "micro_batch": mb, "seq_len": T,
            "step_ms": t * 1e3, "tokens_per_s": tok_s, "tflops": tok_s * fpt / 1e12,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30, "final_loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["small", "base"], choices=list(CASES))
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--optims", nargs="+", default=["adamw"], choices=list(OPTIMS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    datasheet = peak_flops(dev) / 1e12
    measured = matmul_tflops()
    rows = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for case in args.models:
        for c in modes:
            for optim in args.optims:
                r = bench(case, c, args.steps, args.warmup, optim)
                r["mfu_datasheet"], r["mfu_measured_matmul"] = r["tflops"] / datasheet, r["tflops"] / measured
                rows.append(r)
                torch.cuda.empty_cache()
    header = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "datasheet_bf16_tflops": datasheet, "measured_matmul_bf16_tflops": measured}
    print(json.dumps(header))
    print(f"{'case':<11}{'compile':>8}{'optim':>16}{'params':>9}{'batch':>11}{'step ms':>9}{'tok/s':>11}{'TFLOP/s':>9}"
          f"{'MFU(ds)':>9}{'MFU(mm)':>9}{'mem GiB':>9}")
    for r in rows:
        print(f"{r['case']:<11}{str(r['compile']):>8}{r['optim']:>16}{r['params_M']:>8.1f}M"
              f"{r['micro_batch']:>5}x{r['seq_len']:<5}"
              f"{r['step_ms']:>9.1f}{r['tokens_per_s']:>11,.0f}{r['tflops']:>9.1f}{r['mfu_datasheet']:>9.1%}"
              f"{r['mfu_measured_matmul']:>9.1%}{r['peak_mem_GiB']:>9.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
