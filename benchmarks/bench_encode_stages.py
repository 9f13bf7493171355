"""Where encode's time goes: the encode kernel cut short after each stage, timed on one tensor.

The cuts are made on a copy of the kernel's source (``--source``, default the shipped ``flexdemo/ops/encode.py``; an
older revision can be passed to compare) loaded as a temporary module; each cut stores the momentum and one value that
depends on the work so far, so the compiler cannot drop it. Stages: 0 load + momentum update, 1 + forward DCT,
10 + bracket of the k-th largest, 11 + narrowing, 12 + candidates copied out, 2 + ranking and payload, 9 whole kernel
(the 2-bit codes and the subtraction of what they stand for).
Registers and spills per cut come from the compiled kernel.

    python benchmarks/bench_encode_stages.py --out stages.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import copy_bandwidth, ms  # noqa: E402

from flexdemo.chunks import ChunkLayout  # noqa: E402
from flexdemo.dct import dct_matrix  # noqa: E402
from flexdemo.ops.options import KernelOptions  # noqa: E402

# (stage, the lines before which it returns: the first found, this revision's or d579432's, value it stores)
CUTS = [(0, ["    d = tl.load(d_ptr + si[:, None] * S + si[None, :])\n"], "tl.sum(m)"),
        (1, ["    offs = si[:, None] * S + si[None, :]\n    if SELECT"], "tl.sum(coef)"),
        (10, ["        lo, n_lo = _narrow("], "lo + n_lo"),
        (11, ["        if COMPACT:\n            row =", "        if COMPACT and n_lo <= S:\n"], "lo + n_lo"),
        (12, ["            tl.debug_barrier()\n"], "lo + n_lo"),
        (2, ["    # m -= D^T Y D"], "c")]


def staged_module(source: Path):
    """The kernel's source with a STAGE constexpr and an early return at each cut, imported as a module."""
    src = source.read_text()
    end = src.index("):\n", src.index("def _encode_kernel("))  # the kernel's signature ends here: one more argument
    src = src[:end] + ", STAGE: tl.constexpr = 9" + src[end:]
    for stage, where, value in CUTS:
        before = next((w for w in where if w in src), None)
        if before is None:
            raise SystemExit(f"{source}: no cut point for stage {stage} ({where[0].strip()!r})")
        ind = before[:len(before) - len(before.lstrip())]
        cut = (f"{ind}if STAGE == {stage}:\n{ind}    tl.store(vals_ptr + c, ({value}).to(vals_ptr.dtype.element_ty))\n"
               f"{ind}    tl.store(mp + r * sm + q, m, mask=mask)\n{ind}    return\n")
        src = src.replace(before, cut + before, 1)
    path = Path(tempfile.mkdtemp()) / "encode_staged.py"  # triton.jit needs a real file for the source
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("encode_staged", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, default=ROOT / "flexdemo/ops/encode.py")
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 11008])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    mod = staged_module(args.source)
    rows, cols = args.shape
    lay, k, s = ChunkLayout(rows, cols, 64), 32, 64
    bw = copy_bandwidth()
    floor = 12 * rows * cols / bw * 1e3
    dev = "cuda"
    grad = torch.randn(rows, cols, device=dev) * 1e-3
    delta = torch.randn(rows, cols, device=dev) * 1e-3
    d = dct_matrix(s, dev, torch.float32)
    vals = torch.empty(lay.num_chunks * k, device=dev, dtype=torch.bfloat16)
    idx = torch.empty(lay.num_chunks * k, device=dev, dtype=torch.int32)
    codes = torch.empty(lay.num_chunks * k, device=dev, dtype=torch.uint8)
    scales = torch.empty(lay.num_chunks, device=dev)
    out = []
    # the default forward DCT for a bf16 wire, dct_forward=tf32 and =bf16; values as the default wire's 2-bit codes
    for fwd in (None, "tf32", "bf16"):
        for stage in [0, 1, 10, 11, 12, 2, 9]:
            opts = mod._launch_options(KernelOptions(forward_precision=fwd), k, s, torch.bfloat16, bits=2)
            scratch = mod._scratch(lay.num_chunks, opts, dev)

            def run():
                return mod._encode_kernel[(lay.num_chunks,)](
                    grad, delta, d, vals, idx, codes, scales, scratch, d, d, d, rows, cols, grad.stride(0),
                    delta.stride(0), lay.grid[1], 0, 0.999, 1e-4, 1.0, HAS_GRAD=True, GROUPED=False, LR_PTR=False,
                    LOSE_PART=False, STAGE=stage, **opts)

            kern = run()
            t = ms(run)
            out.append({"forward": opts["FWD_PRECISION"], "stage": stage, "ms": t, "x_floor": t / floor, "registers": kern.n_regs,
                        "spill_bytes": kern.n_spills, "maxnreg": opts.get("maxnreg")})
            print(json.dumps(out[-1]), flush=True)
    if args.out:
        head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "source": str(args.source),
                "shape": args.shape, "copy_GBps": bw / 1e9}
        Path(args.out).write_text(json.dumps({**head, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
