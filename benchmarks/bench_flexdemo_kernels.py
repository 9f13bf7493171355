"""FlexDeMo encode and decode + apply: torch reference, torch.compile of it, and the Triton kernels, side by side.

Floor = bytes each element must move once over the copy bandwidth measured in the same run:
encode reads the gradient and reads + writes the fp32 momentum (12 B/element); decode + apply reads + writes the
parameter (8 B fp32, 4 B bf16). Also: one fused torch.optim.AdamW step on the same tensor, and the payload size.

    python benchmarks/bench_flexdemo_kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexdemo.chunks import ChunkLayout  # noqa: E402
from flexdemo.ops.decode import decode_apply_triton  # noqa: E402
from flexdemo.ops.decode_reference import decode_apply_reference  # noqa: E402
from flexdemo.ops.encode import encode_triton  # noqa: E402
from flexdemo.ops.encode_reference import encode_reference  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]


def ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth() -> float:
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (ms(lambda: y.copy_(x)) / 1e3)


def case(rows: int, cols: int, dtype: torch.dtype, k: int, s: int, replicas: int, bw: float) -> list[dict]:
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
    enc_floor = (n * grad.element_size() + 8 * n) / bw * 1e3
    dec_floor = 2 * n * param.element_size() / bw * 1e3
    compiled_enc = torch.compile(encode_reference)
    compiled_dec = torch.compile(decode_apply_reference)
    impls = {
        "torch": (lambda: encode_reference(grad, delta, lay, 0.999, 1e-4, k, vals, idx64),
                  lambda: decode_apply_reference(param, gi, gv, lay, k, 1e-4, 1.0, True)),
        "torch.compile": (lambda: compiled_enc(grad, delta, lay, 0.999, 1e-4, k, vals, idx64),
                          lambda: compiled_dec(param, gi, gv, lay, k, 1e-4, 1.0, True)),
        "triton": (lambda: encode_triton(grad, delta, lay, 0.999, 1e-4, k, vals, idx32),
                   lambda: decode_apply_triton(param, gi, gv, lay, k, 1e-4, 1.0, True)),
    }
    p_adam = torch.nn.Parameter(param.clone())
    p_adam.grad = grad.clone()
    adam = torch.optim.AdamW([p_adam], lr=1e-4, fused=True)
    adam_ms = ms(adam.step)
    tag = f"{rows}x{cols} {str(dtype).replace('torch.', '')}"
    rows_out = []
    for name, (enc, dec) in impls.items():
        try:
            e, d = ms(enc), ms(dec)
        except Exception as err:  # report, keep going (e.g. a compile failure)
            rows_out.append({"case": tag, "impl": name, "error": repr(err)[:200]})
            continue
        rows_out.append({"case": tag, "impl": name, "encode_ms": e, "encode_x_floor": e / enc_floor,
                         "decode_ms": d, "decode_x_floor": d / dec_floor, "adamw_ms": adam_ms,
                         "enc_dec_over_adamw": (e + d) / adam_ms, "payload_bytes": nk * (2 + 1.5),
                         "ratio_vs_dense_bf16": 2 * n / (nk * 3.5)})
    return rows_out


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
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "copy_GBps": bw / 1e9, "k": args.k, "chunk": args.chunk, "replicas": args.replicas}
    print(json.dumps(head))
    print(f"{'case':<20}{'impl':<15}{'enc ms':>8}{'x floor':>9}{'dec ms':>8}{'x floor':>9}{'AdamW ms':>10}{'(e+d)/AdamW':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<20}{r['impl']:<15} error: {r['error']}")
            continue
        print(f"{r['case']:<20}{r['impl']:<15}{r['encode_ms']:>8.3f}{r['encode_x_floor']:>9.1f}{r['decode_ms']:>8.3f}"
              f"{r['decode_x_floor']:>9.1f}{r['adamw_ms']:>10.3f}{r['enc_dec_over_adamw']:>13.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
