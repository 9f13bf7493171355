"""FlexDeMo encode and decode + apply: torch reference, torch.compile of it, and the Triton kernels, side by side.

Floor = bytes each element must move once over the copy bandwidth measured in the same run:
encode reads the gradient and reads + writes the fp32 momentum (12 B/element); decode + apply reads + writes the
parameter (8 B fp32, 4 B bf16). Also: one fused torch.optim.AdamW step on the same tensor (its floor: read the
parameter, gradient and both moments, write the parameter and both moments: 7 elements of the parameter's dtype),
and the payload size.

    python benchmarks/bench_flexdemo_kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import copy_bandwidth, ms  # noqa: E402

from flexdemo.chunks import ChunkLayout  # noqa: E402
from flexdemo.ops.decode import decode_apply_triton  # noqa: E402
from flexdemo.ops.decode_reference import decode_apply_reference  # noqa: E402
from flexdemo.ops.encode import encode_triton  # noqa: E402
from flexdemo.ops.encode_reference import encode_reference  # noqa: E402
from flexdemo.ops.options import KernelOptions  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]


# The defaults and their nearest neighbours (earlier runs, in benchmarks/HISTORY.md: ieee dots and maxmask selection
# 2-5x slower, 8 warps slower for both kernels). The first of each list is the default (dct_forward=fp32 and
# dct_inverse=fp32); fwd-tf32 / decode tf32 are the =tf32 settings, "nocap" is without the encode's register cap.
DEFAULT = KernelOptions()
ENCODE_VARIANTS = [DEFAULT, KernelOptions(forward_precision="tf32"), KernelOptions(forward_precision="tf32x3"),
                   KernelOptions(maxnreg=None), KernelOptions(maxnreg=128), KernelOptions(encode_warps=2),
                   KernelOptions(select="bisect")]
DECODE_VARIANTS = [DEFAULT, KernelOptions(decode_precision="ieee"), KernelOptions(decode_precision="tf32")]


def encode_name(o: KernelOptions) -> str:
    return (f"triton {o.select} fwd-{o.forward_for(torch.bfloat16)} sub-{o.subtract_precision} w{o.encode_warps}"
            + ("" if o.maxnreg == 168 else f" cap{o.maxnreg}" if o.maxnreg else " nocap"))


def decode_name(o: KernelOptions) -> str:
    return f"triton {o.decode_precision} w{o.decode_warps}"


def memory_floors_ms(n: int, grad_bytes: int, param_bytes: int, bw: float) -> dict[str, float]:
    """Per op, the time to move each element's bytes once at ``bw`` (bytes/s): encode reads the gradient and reads +
    writes the fp32 momentum; decode + apply reads + writes the parameter; fused AdamW reads the parameter, gradient
    and two moments and writes the parameter and moments (all in the parameter's dtype)."""
    per_element = {"encode": grad_bytes + 8, "decode": 2 * param_bytes, "adamw": 7 * param_bytes}
    return {op: n * b / bw * 1e3 for op, b in per_element.items()}


def case(rows: int, cols: int, dtype: torch.dtype, k: int, s: int, replicas: int, bw: float) -> list[dict]:
    """One row per implementation of encode and of decode + apply (Triton: every variant), and the AdamW step."""
    lay = ChunkLayout(rows, cols, s)
    n, nk = rows * cols, lay.num_chunks * k
    grad = torch.randn(rows, cols, device="cuda", dtype=dtype) * 1e-3
    delta = torch.randn(rows, cols, device="cuda") * 1e-3
    vals = torch.empty(nk, device="cuda", dtype=torch.bfloat16)
    idx32 = torch.empty(nk, device="cuda", dtype=torch.int32)
    idx64 = torch.empty(nk, device="cuda", dtype=torch.int64)
    param = torch.randn(rows, cols, device="cuda", dtype=dtype)
    encode_triton(grad, delta, lay, 0.999, 1e-4, k, vals, idx32)
    gi, gv = idx32.repeat(replicas, 1), vals.repeat(replicas, 1)
    floors = memory_floors_ms(n, grad.element_size(), param.element_size(), bw)
    compiled_enc = torch.compile(encode_reference)
    compiled_dec = torch.compile(decode_apply_reference)
    impls = [
        ("encode", "torch", lambda: encode_reference(grad, delta, lay, 0.999, 1e-4, k, vals, idx64)),
        ("encode", "torch.compile", lambda: compiled_enc(grad, delta, lay, 0.999, 1e-4, k, vals, idx64)),
        ("decode", "torch", lambda: decode_apply_reference(param, gi, gv, lay, k, 1e-4, 1.0, True)),
        ("decode", "torch.compile", lambda: compiled_dec(param, gi, gv, lay, k, 1e-4, 1.0, True)),
    ]
    for o in ENCODE_VARIANTS:
        impls.append(("encode", encode_name(o), lambda o=o: encode_triton(grad, delta, lay, 0.999, 1e-4, k, vals,
                                                                          idx32, o)))
    for o in DECODE_VARIANTS:
        impls.append(("decode", decode_name(o), lambda o=o: decode_apply_triton(param, gi, gv, lay, k, 1e-4, 1.0,
                                                                                True, o)))
    p_adam = torch.nn.Parameter(param.clone())
    p_adam.grad = grad.clone()
    adam = torch.optim.AdamW([p_adam], lr=1e-4, fused=True)
    tag = f"{rows}x{cols} {str(dtype).replace('torch.', '')}"
    t_adam = ms(adam.step)
    out = [{"case": tag, "op": "adamw", "impl": "fused AdamW", "ms": t_adam, "x_floor": t_adam / floors["adamw"],
            "floor_ms": floors["adamw"]}]
    for op, name, fn in impls:
        try:
            t_ms = ms(fn)
        except Exception as err:  # report, keep going (e.g. a compile failure)
            out.append({"case": tag, "op": op, "impl": name, "error": repr(err)[:300]})
            continue
        out.append({"case": tag, "op": op, "impl": name, "ms": t_ms, "x_floor": t_ms / floors[op], "floor_ms": floors[op]})
        launch = fn()
        if hasattr(launch, "n_regs"):  # a Triton encode: its registers and spills
            out[-1].update(registers=launch.n_regs, spill_bytes=launch.n_spills)
    return out


def summarize(rows: list[dict]) -> dict:
    """The Triton variant with the least total time over all cases, per op (what the defaults should be)."""
    best = {}
    for op in ("encode", "decode"):
        totals: dict[str, float] = {}
        for r in rows:
            if r["op"] == op and r["impl"].startswith("triton") and "ms" in r:
                totals[r["impl"]] = totals.get(r["impl"], 0.0) + r["ms"]
        best[op] = min(totals, key=totals.get) if totals else None
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            rows += case(*shape, dtype, args.k, args.chunk, args.replicas, bw)
    best = summarize(rows)
    options = {o: v for o, v in [*((encode_name(o), o) for o in ENCODE_VARIANTS),
                                 *((decode_name(o), o) for o in DECODE_VARIANTS)]}
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "copy_GBps": bw / 1e9, "k": args.k, "chunk": args.chunk,
            "replicas": args.replicas, "best": best,
            "best_options": {op: dataclasses.asdict(options[name]) for op, name in best.items() if name},
            "payload_bytes_per_coef": 2 + 1.5, "ratio_vs_dense_bf16": 2 / (args.k * 3.5 / args.chunk ** 2)}
    print(json.dumps(head))
    adam = {r["case"]: r["ms"] for r in rows if r["op"] == "adamw"}
    print(f"{'case':<20}{'op':<8}{'impl':<28}{'ms':>8}{'x floor':>9}{'x AdamW':>9} regs/spill bytes")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<20}{r['op']:<8}{r['impl']:<28} error: {r['error']}")
            continue
        print(f"{r['case']:<20}{r['op']:<8}{r['impl']:<28}{r['ms']:>8.3f}{r['x_floor']:>9.2f}"
              f"{r['ms'] / adam[r['case']]:>9.2f} {r.get('registers', '')}/{r.get('spill_bytes', '')}")
    for case_ in adam:  # the chosen pair: encode + decode + apply over one AdamW step
        pick = {op: next((r for r in rows if r["case"] == case_ and r["impl"] == best[op] and "ms" in r), None)
                for op in ("encode", "decode")}
        if all(pick.values()):
            ratio = (pick["encode"]["ms"] + pick["decode"]["ms"]) / adam[case_]
            rows.append({"case": case_, "op": "enc+dec/adamw", "impl": f"{best['encode']} + {best['decode']}",
                         "ratio": ratio})
            print(f"{case_:<20}(encode + decode) / AdamW with {best['encode']} + {best['decode']}: {ratio:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
