"""Tidy result tables: rows of dicts written as CSV and JSON (columns: model, mixture, expert, rank, params, task,
category, metric, score, ...)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ("model", "mixture", "expert", "rank", "params", "active_params", "task", "category", "domain", "metric",
           "score")


def write_table(rows: list[dict], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    csv_path, json_path = out.with_suffix(".csv"), out.with_suffix(".json")
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    json_path.write_text(json.dumps(rows, indent=1, default=str))
    return csv_path, json_path
