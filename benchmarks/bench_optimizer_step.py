"""Optimizer step time on one GPU: FlexDeMo (torch path and Triton kernels) vs AdamW.

Two views, same run:
- whole model (``--model``): every parameter with a random gradient; FlexDeMo with 1 replica (no exchange) and with
  2 simulated replicas (its own payload decoded twice: the decode cost of a 2-node run, without the network), the
  same with ``cuda_graphs`` (each phase one graph replay), with the 152.9x wire (k 28, 2-bit codes: the
  quantisation inside the encode kernel), with ``base_step=coefficient_sign`` (also with the 183.8x wire: signs
  and Elias-Fano indices), the default with its wire packed in torch (``wire_pack=torch``, the Triton packing's
  baseline), and with ``base_step=orthogonal`` per
  chunk (decode, Newton-Schulz and apply in one kernel) and over whole matrices, fp32 and bf16 (``--skip-slow``
  leaves the whole matrices and the torch path out); rows that name no base_step are DeMo's direct step (the default
  until 2026-12-04, and the one the others are compared with), the default's are the coefficient sign's;
- one tensor (default 4096 x 11008 fp32): encode and decode + apply separately (``FlexDeMo.encode`` and
  ``decode_apply``: the kernels with the payload's packing; bench_flexdemo_kernels.py times the kernels
  alone), against their memory floor
  (encode: read grad, read + write momentum = 12 B/elt; decode + apply: read + write param = 8 B/elt) over the
  copy bandwidth measured in the same run, and against one fused AdamW step on the same tensor.

    python benchmarks/bench_optimizer_step.py --model base --out results.json
    python benchmarks/bench_optimizer_step.py --model base 1b --profile $OUT/profile   # where the step's time goes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import copy_bandwidth, ms  # noqa: E402

from flexdemo import DeMoConfig, FlexDeMo  # noqa: E402
from flexdemo.config import DEMO_WIRE  # noqa: E402
from flexdemo.ops.options import KernelOptions  # noqa: E402
from flexmore.model import build_model, load_preset  # noqa: E402

TF32 = ", dct_forward=tf32"  # the fast rows (dct_inverse's default, three bf16 products, is faster than its tf32)


CHOICE: KernelOptions | None = None  # --kernel-choice: the kernels' fastest variants, else their defaults


# the default's settings that flexdemo() below would otherwise pin to DeMo's (today: the coefficient sign, 2-bit
# values, Elias-Fano indices)
DEFAULT = {k: getattr(DeMoConfig(), k) for k in ("base_step", "value_bits", "index_coding")}


def flexdemo(params, wire_pack: str = "triton", **settings) -> FlexDeMo:
    """FlexDeMo with these DeMoConfig settings (DeMo's: base_step=direct, bf16 values, 12-bit indices, unless they
    name others; the rows keep what they measured before the defaults changed); with --kernel-choice, its kernel
    variants at the precisions the settings ask for (dct_forward, dct_inverse); ``wire_pack``: the wire's packing in
    Triton or torch (``KernelOptions.wire_pack``)."""
    cfg = DeMoConfig(**{"base_step": "direct", **DEMO_WIRE, **settings})
    opts = None
    if CHOICE is not None:
        own = cfg.kernel_options()
        opts = dataclasses.replace(CHOICE, forward_precision=own.forward_precision,
                                   decode_precision=own.decode_precision)
    if wire_pack != "triton":
        opts = dataclasses.replace(opts or cfg.kernel_options(), wire_pack=wire_pack)
    return FlexDeMo(params, lr=1e-4, config=cfg, kernel_options=opts)


def bench(fn) -> float:
    return ms(fn, warmup=50, rep=300)


def params_with_grads(shapes, dtype=torch.float32):
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    return ps


def replica_rows(name: str, demo: FlexDeMo) -> list[dict]:
    """The step with 1 replica, and with 2 simulated ones (its own payload decoded twice)."""
    return [{"what": f"{name}, 1 replica", "ms": bench(demo.step)},
            {"what": f"{name}, 2 replicas (decode twice)",
             "ms": bench(lambda: demo.decode_apply(torch.stack([demo.encode()] * 2)))}]


def released(rows: list[dict]) -> list[dict]:
    """Rows measured by an optimizer no longer referenced: its parameters, states and graph pools are freed before
    the next one is built (`1b` holds ~19 GB per optimizer; two at once do not fit an 80 GB H100 beside AdamW's)."""
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def model_rows(model_name: str, skip_slow: bool = False) -> list[dict]:
    cfg = load_preset(model_name)
    cfg = dataclasses.replace(cfg, vocab_size=cfg.resolved_vocab(259))
    shapes = [p.shape for p in build_model(cfg, device="meta").parameters()]
    numel = sum(torch.Size(s).numel() for s in shapes)

    def adamw(**kind) -> float:
        return bench(torch.optim.AdamW(params_with_grads(shapes), lr=1e-4, **kind).step)

    def demo_rows(name: str, **settings) -> list[dict]:
        return replica_rows(name, flexdemo(params_with_grads(shapes), kernels="triton", **settings))

    rows = released([{"what": f"{model_name}: fused AdamW step", "ms": adamw(fused=True)}])
    rows += released([{"what": f"{model_name}: foreach AdamW step", "ms": adamw(foreach=True)}])
    for graphs in (False, True):  # the default first (a run cut short keeps it)
        name = (f"{model_name}: FlexDeMo triton, the default ({' '.join(f'{k}={v}' for k, v in DEFAULT.items())})"
                + (", cuda_graphs" if graphs else ""))
        rows += released(demo_rows(name, **DEFAULT, cuda_graphs=graphs))
    for graphs in (False, True):  # the same with the wire packed and unpacked in torch (before 2026-12-06)
        name = (f"{model_name}: FlexDeMo triton, the default, wire_pack=torch" + (", cuda_graphs" if graphs else ""))
        rows += released(demo_rows(name, **DEFAULT, cuda_graphs=graphs, wire_pack="torch"))
    # with 2-bit values the forward DCT's precision moves only near-ties of the selection; the residual stored in
    # bf16 moves 8 bytes per element through the encode instead of 12
    variants = [("fp32", "tf32"), ("fp32", "bf16"), ("bf16", "fp32"), ("bf16", "bf16")]  # (momentum, forward)
    for (mom, fwd), graphs in itertools.product(variants, (False, True)):
        name = (f"{model_name}: FlexDeMo triton, the default" + (f", momentum_dtype={mom}" if mom != "fp32" else "")
                + (f", dct_forward={fwd}" if fwd != "fp32" else "") + (", cuda_graphs" if graphs else ""))
        rows += released(demo_rows(name, **DEFAULT, cuda_graphs=graphs, dct_forward=fwd, momentum_dtype=mom))
    for kernels, fwd in (("torch", "fp32"), ("triton", "fp32"), ("triton", "tf32"))[skip_slow:]:
        name = f"{model_name}: FlexDeMo {kernels}" + (TF32 if fwd == "tf32" else "")
        rows += released(replica_rows(name, flexdemo(params_with_grads(shapes), kernels=kernels, dct_forward=fwd)))
    for fwd in ("fp32", "tf32"):  # encode and decode + apply replayed as CUDA graphs: the host's launches go
        name = f"{model_name}: FlexDeMo triton, cuda_graphs" + (TF32 if fwd == "tf32" else "")
        rows += released(demo_rows(name, dct_forward=fwd, cuda_graphs=True))
    for graphs in (False, True):  # k 28, values as 2-bit codes (152.9x less than dense bf16 for base on 2 x 2)
        name = f"{model_name}: FlexDeMo triton, topk=28 value_bits=2" + (", cuda_graphs" if graphs else "")
        rows += released(demo_rows(name, topk=28, value_bits=2, cuda_graphs=graphs))
    for graphs in (False, True):
        name = f"{model_name}: FlexDeMo triton, base_step=coefficient_sign" + (", cuda_graphs" if graphs else "")
        rows += released(demo_rows(name, base_step="coefficient_sign", cuda_graphs=graphs))
    for graphs in (False, True):  # the sign wire with Elias-Fano indices (183.8x): Elias-Fano packing in torch
        name = (f"{model_name}: FlexDeMo triton, base_step=coefficient_sign value_bits=1 index_coding=elias_fano"
                + (", cuda_graphs" if graphs else ""))
        rows += released(demo_rows(name, base_step="coefficient_sign", value_bits=1, index_coding="elias_fano",
                                   cuda_graphs=graphs))
    for precision in ("fp32", "bf16"):  # per chunk: decode, the orthogonal step and the apply in one pass
        rows += released(demo_rows(f"{model_name}: FlexDeMo triton, base_step=orthogonal (chunk, {precision})",
                                   base_step="orthogonal", orthogonal_scope="chunk", orthogonal_precision=precision))
    for precision in () if skip_slow else ("fp32", "bf16"):  # whole matrices: Newton-Schulz products in torch
        demo = flexdemo(params_with_grads(shapes), kernels="triton", base_step="orthogonal", orthogonal_scope="matrix",
                        orthogonal_precision=precision)
        rows.append({"what": f"{model_name}: FlexDeMo triton, base_step=orthogonal (matrix, {precision}), 1 replica",
                     "ms": bench(demo.step)})
        del demo
        released(rows)
    for r in rows:
        r["params"] = numel
    return rows


def tensor_rows(shape: tuple[int, int], dtype: torch.dtype, bw: float) -> list[dict]:
    n = shape[0] * shape[1]
    floor_enc = 12 * n / bw * 1e3
    floor_dec = 8 * n / bw * 1e3 if dtype == torch.float32 else 4 * n / bw * 1e3
    tag = f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')}"
    adam = torch.optim.AdamW(params_with_grads([shape], dtype), lr=1e-4, fused=True)
    ad = bench(adam.step)
    floor_adam = (28 if dtype == torch.float32 else 20) * n / bw * 1e3  # read p, g, m, v; write p, m, v
    rows = [{"what": f"{tag}: fused AdamW step", "ms": ad, "floor_ms": floor_adam, "x_floor": ad / floor_adam}]
    for kernels, fwd in (("torch", "fp32"), ("triton", "fp32"), ("triton", "tf32"), ("triton", "bf16")):
        demo = flexdemo(params_with_grads([shape], dtype), kernels=kernels, dct_forward=fwd)
        gathered = demo.encode()[None]
        enc, dec = bench(demo.encode), bench(lambda: demo.decode_apply(gathered))
        kernels += f", dct_forward={fwd}" if fwd != "fp32" else ""
        rows += [{"what": f"{tag}: {kernels} encode", "ms": enc, "floor_ms": floor_enc, "x_floor": enc / floor_enc},
                 {"what": f"{tag}: {kernels} decode + apply (1 replica)", "ms": dec, "floor_ms": floor_dec,
                  "x_floor": dec / floor_dec},
                 {"what": f"{tag}: {kernels} (encode + decode) / AdamW", "ms": enc + dec, "ratio": (enc + dec) / ad}]
    for precision in ("fp32", "bf16"):  # decode + the orthogonal step per chunk + apply, one pass
        demo = flexdemo(params_with_grads([shape], dtype), kernels="triton", base_step="orthogonal",
                        orthogonal_scope="chunk", orthogonal_precision=precision)
        gathered = demo.encode()[None]
        dec = bench(lambda: demo.decode_apply(gathered))
        rows.append({"what": f"{tag}: triton decode + orthogonal step ({precision}) + apply (1 replica)", "ms": dec,
                     "floor_ms": floor_dec, "x_floor": dec / floor_dec})
    return rows


def gpu_work_ms(events, steps: int) -> float:
    """Device time per step from profiler averages. A user annotation (the optimizer's step range) spans its own
    kernels on the device too, so counting it would double the work."""
    return sum(e.self_device_time_total for e in events if not getattr(e, "is_user_annotation", False)) / steps / 1e3


def profile_step(model_name: str, out: Path, cuda_graphs: bool = False) -> dict:
    """Where the default FlexDeMo step's time goes (Triton, 1 replica): the host's time to enqueue a step against the
    step itself (equal: host-bound), its GPU work per step, and torch.profiler's tables (``out``): ops by host time,
    then by device time, so the kernels a GPU-bound step spends its time in are listed too."""
    from torch.profiler import ProfilerActivity, profile

    cfg = load_preset(model_name)
    shapes = [p.shape for p in build_model(dataclasses.replace(cfg, vocab_size=cfg.resolved_vocab(259)),
                                           device="meta").parameters()]
    demo = flexdemo(params_with_grads(shapes), kernels="triton", cuda_graphs=cuda_graphs, **DEFAULT)
    for _ in range(10):
        demo.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        demo.step()
    host = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            demo.step()
        torch.cuda.synchronize()
    ops = prof.key_averages()
    gpu_ms = gpu_work_ms(ops, steps=5)
    out.write_text(f"by host time\n{ops.table(sort_by='self_cpu_time_total', row_limit=50)}\n\nby device time\n"
                   f"{ops.table(sort_by='self_cuda_time_total', row_limit=30)}\n")
    name = "cuda_graphs step" if cuda_graphs else "step"
    return {"what": f"{model_name}: FlexDeMo triton, the default {name}, host enqueue time (profile: {out.name})",
            "ms": host, "step_ms": total, "gpu_ms": gpu_ms}


def kernel_choice(path: str) -> KernelOptions:
    """The variants bench_flexdemo_kernels.py found fastest (its ``best_options``)."""
    best = json.loads(Path(path).read_text())["best_options"]
    enc, dec = best["encode"], best["decode"]
    return KernelOptions(select=enc["select"], subtract_precision=enc["subtract_precision"],
                         encode_warps=enc["encode_warps"], maxnreg=enc["maxnreg"], decode_warps=dec["decode_warps"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="*", default=["base", "1b"])
    ap.add_argument("--tensor", type=int, nargs=2, default=[4096, 11008])
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernel-choice", default=None, help="bench_flexdemo_kernels.py's JSON: use its fastest variants")
    ap.add_argument("--skip-slow", action="store_true", help="leave out the torch path and the orthogonal step "
                    "over whole matrices (minutes at 1b; the per-chunk one stays)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also profile each model's FlexDeMo step: host enqueue time, and a table of ops per model")
    args = ap.parse_args()
    global CHOICE
    CHOICE = kernel_choice(args.kernel_choice) if args.kernel_choice else None
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = []
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "copy_bandwidth_GBps": bw / 1e9, "triton_variants": None if CHOICE is None else dataclasses.asdict(CHOICE)}
    print(json.dumps(head))

    def report(new: list[dict]) -> None:
        """Print and save as each model finishes, so a run cut by a time limit keeps what it measured."""
        rows.extend(new)
        for r in new:
            extra = f"  floor {r['floor_ms']:.3f} ms ({r['x_floor']:.1f}x)" if "floor_ms" in r else ""
            extra += f"  ratio {r['ratio']:.2f}" if "ratio" in r else ""
            extra += f"  (the step itself {r['step_ms']:.3f} ms)" if "step_ms" in r else ""
            extra += f"  (GPU work {r['gpu_ms']:.3f} ms)" if "gpu_ms" in r else ""
            print(f"{r['what']:<55}{r['ms']:>9.3f} ms{extra}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))

    for m in args.model:
        report(model_rows(m, args.skip_slow))
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            report([profile_step(m, Path(args.profile) / f"profile_{m}.txt"),
                    profile_step(m, Path(args.profile) / f"profile_{m}_graphs.txt", cuda_graphs=True)])
    report(tensor_rows(tuple(args.tensor), torch.float32, bw))

if __name__ == "__main__":
    main()
