"""Where a Triton kernel's time goes, per line of its source: ncu's per-instruction source counters (warp stall
samples, instructions executed, excess shared-memory wavefronts = bank conflicts) summed over the kernel-file line
each SASS instruction came from (nvdisasm's line table of the same cubin). Instructions of triton's own library
(tl.sum, tl.max, ...) count towards the kernel line before them.

    ncu --import-source yes --section SourceCounters -k regex:_encode_kernel -s 2 -c 1 -o enc python3 ...
    ncu -i enc.ncu-rep --page source --csv --print-source sass > enc.csv
    nvdisasm --print-line-info -c encode.cubin > encode.li    # the cubin: kernel.asm["cubin"] of the launch
    python benchmarks/ncu_source_lines.py enc.csv encode.li flexdemo/ops/encode.py
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
from pathlib import Path


def line_of_offsets(listing: Path, source_name: str) -> dict[int, int]:
    """SASS offset -> the kernel-file line it belongs to (the last kernel-file line seen at or before it)."""
    out, line = {}, None
    for text in listing.read_text().splitlines():
        m = re.search(r'//## File "(.*?)", line (\d+)', text)
        if m:
            if m.group(1).endswith(source_name):
                line = int(m.group(2))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/", text)
        if m and line is not None:
            out[int(m.group(1), 16)] = line
    return out


def per_line(counters: Path, lines: dict[int, int]) -> tuple[dict[int, collections.Counter], collections.Counter]:
    rows = list(csv.reader(counters.open()))
    head, data = rows[1], rows[2:]
    col = {h: i for i, h in enumerate(head)}
    stalls = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    keys = {"samples": "Warp Stall Sampling (All Samples)", "inst": "Instructions Executed",
            "conflicts": "L1 Wavefronts Shared Excessive", **{s: s for s in stalls}}
    base, seen = int(data[0][0], 16), set()
    agg: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()
    for r in data:
        offset = int(r[0], 16) - base
        if offset in seen:  # the csv repeats rows per source view
            continue
        seen.add(offset)
        for key, name in keys.items():
            value = float(r[col[name]]) if r[col[name]] not in ("", "-") else 0.0
            agg[lines.get(offset, 0)][key] += value
            total[key] += value
    return agg, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("counters", type=Path, help="ncu --page source --csv --print-source sass")
    ap.add_argument("listing", type=Path, help="nvdisasm --print-line-info of the profiled cubin")
    ap.add_argument("source", type=Path, help="the kernel's .py file")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    agg, total = per_line(args.counters, line_of_offsets(args.listing, args.source.name))
    src = args.source.read_text().splitlines()
    print(f"{'samples':>8} {'instr':>6} {'conflicts':>10}  line  source  (top stall reasons)")
    for line, c in sorted(agg.items(), key=lambda kv: -kv[1]["samples"])[:args.top]:
        reasons = sorted(((v, k[6:]) for k, v in c.items() if k.startswith("stall_")), reverse=True)[:3]
        text = src[line - 1].strip()[:60] if 0 < line <= len(src) else "(prologue)"
        print(f"{100 * c['samples'] / total['samples']:7.1f}% {100 * c['inst'] / total['inst']:5.1f}% "
              f"{c['conflicts'] / 1e6:9.2f}M  {line:4}  {text:60}  "
              + " ".join(f"{k}:{100 * v / max(c['samples'], 1):.0f}%" for v, k in reasons))


if __name__ == "__main__":
    main()
