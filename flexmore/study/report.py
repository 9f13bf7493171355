"""The study's analysis: score vs log2(rank) per task and per category (OLS with 95% CIs), best ranks, the best-rank
mixture against the full-size mixture, plots (PNG) and a markdown summary."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from flexmore.study.regression import fit_log2

FULL = "full"


def higher_is_better(row: dict) -> float:
    """Validation losses enter as minus the loss, so every score grows with quality."""
    return -row["score"] if row["metric"] == "loss" else row["score"]


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


SECONDARY_METRICS = ("acc_norm",)  # kept in the table, left out of the analysis (one score per task)


def counts(row: dict) -> bool:
    """Whether a design (a) row measures its own expert: tasks and validation sets of another domain (another
    expert's, or the public one's) say how much the expert disturbs them, not how good it is at its own."""
    return row["metric"] not in SECONDARY_METRICS and row.get("domain") in (None, row.get("expert"))


def analyse(rows: list[dict]) -> dict:
    a = [r for r in rows if r.get("design") == "a" and counts(r)]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in a:
        by_task[r["task"]].append(r)
    out = {"tasks": {}, "categories": {}}
    cats: dict[str, list[dict]] = defaultdict(list)
    for task, rs in sorted(by_task.items()):
        cats[rs[0]["category"]] += rs
        out["tasks"][task] = _summarise(rs)
    for cat, rs in sorted(cats.items()):
        out["categories"][cat] = _summarise(rs)
    b_full = [r for r in rows if r.get("design") == "b" and str(r["rank"]) == FULL]
    c = [r for r in rows if r.get("design") == "c"]
    if b_full and c:
        task_rows = lambda rs: ([higher_is_better(r) for r in rs if r["metric"] not in ("loss",) + SECONDARY_METRICS]
                                or [higher_is_better(r) for r in rs])
        out["best_vs_full"] = {
            "best_rank_mixture": c[0]["mixture"], "best_ranks": c[0].get("ranks"),
            "score_best": _mean(task_rows(c)), "score_full": _mean(task_rows(b_full)),
            "params_best": c[0]["params"], "params_full": b_full[0]["params"],
            "param_ratio": c[0]["params"] / b_full[0]["params"],
        }
    return out


def _summarise(rs: list[dict]) -> dict:
    by_rank: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        by_rank[str(r["rank"])].append(higher_is_better(r))
    means = {k: _mean(v) for k, v in by_rank.items()}
    best = max(means, key=means.get)
    numeric = [(float(r["rank"]), higher_is_better(r)) for r in rs if str(r["rank"]) != FULL]
    res = {"mean_by_rank": means, "best_rank": best}
    if len({x for x, _ in numeric}) >= 2 and len(numeric) >= 3:
        fit = fit_log2([x for x, _ in numeric], [y for _, y in numeric])
        res["fit"] = {"slope": fit.slope, "ci95": [fit.slope_lo, fit.slope_hi], "intercept": fit.intercept,
                      "r2": fit.r2, "n": fit.n}
    return res


def plots(rows: list[dict], analysis: dict, energy: dict[str, dict[int, float]], out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the sweep's plots need matplotlib: pip install 'flexmore[report]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, want_loss in zip(axes, (False, True)):  # task scores and validation losses live on different scales
        for cat, s in analysis["categories"].items():
            if (cat == "loss") != want_loss:
                continue
            pts = sorted((math.log2(float(k)), v) for k, v in s["mean_by_rank"].items() if k != FULL)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cat)
                if FULL in s["mean_by_rank"]:
                    ax.axhline(s["mean_by_rank"][FULL], ls="--", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xlabel("log2(rank)")
        ax.set_ylabel("minus validation loss" if want_loss else "task score")
        ax.set_title(("validation" if want_loss else "tasks by category") + " (dashed: full size)")
        if ax.lines:
            ax.legend()
    paths.append(_save(fig, out / "score_vs_rank.png"))

    cells: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        cells[r["model"]].append(r)
    pts = sorted((rs[0]["params"], _mean(higher_is_better(r) for r in rs), k) for k, rs in cells.items())
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12)
    front, best = [], float("-inf")
    for p in pts:
        if p[1] > best:
            front.append(p)
            best = p[1]
    ax.plot([p[0] for p in front], [p[1] for p in front], color="C3", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("mean score")
    ax.legend()
    paths.append(_save(fig, out / "params_vs_score.png"))

    if energy:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in sorted(energy.items()):
            ks = sorted(curve)
            ax.plot([math.log2(k) for k in ks], [curve[k] for k in ks], marker="o", label=name)
        ax.set_xlabel("log2(rank)")
        ax.set_ylabel("retained SVD energy")
        ax.legend()
        paths.append(_save(fig, out / "energy.png"))
    return paths


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def summary_markdown(analysis: dict, images: list[Path]) -> str:
    lines = ["# FlexMoRE rank sweep", "", "| task / category | best rank | slope per doubling of rank (95% CI) | R² |",
             "|---|---|---|---|"]
    for kind in ("categories", "tasks"):
        for name, s in analysis[kind].items():
            fit = s.get("fit")
            slope = f"{fit['slope']:+.4f} [{fit['ci95'][0]:+.4f}, {fit['ci95'][1]:+.4f}]" if fit else "n/a"
            label = f"**{name}**" if kind == "categories" else name
            r2 = f"{fit['r2']:.2f}" if fit and fit["r2"] == fit["r2"] else ""
            lines.append(f"| {label} | {s['best_rank']} | {slope} | {r2} |")
    verdict = paper_verdict(analysis)
    if verdict:
        lines += ["", verdict]
    bvf = analysis.get("best_vs_full")
    if bvf:
        lines += ["", f"Best-rank mixture ({bvf['best_ranks']}): score {bvf['score_best']:.4f} with "
                      f"{bvf['params_best']:,} parameters; full-size mixture: {bvf['score_full']:.4f} with "
                      f"{bvf['params_full']:,} ({bvf['param_ratio']:.2f}x the parameters of full size)."]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def paper_verdict(analysis: dict) -> str | None:
    """The paper's finding, checked: reasoning wants a higher rank than knowledge."""
    cats = analysis["categories"]
    if "reasoning" not in cats or "knowledge" not in cats:
        return None
    flat = [c for c in ("reasoning", "knowledge") if max(cats[c]["mean_by_rank"].values()) == min(cats[c]["mean_by_rank"].values())]
    if flat:
        return f"No verdict on the paper's finding: {' and '.join(flat)} scores do not change with rank here."
    rank = lambda c: math.inf if cats[c]["best_rank"] == FULL else float(cats[c]["best_rank"])
    rr, rk = rank("reasoning"), rank("knowledge")
    word = "agrees with" if rr > rk else ("does not separate the categories, unlike" if rr == rk else "contradicts")
    return (f"Best rank by category: reasoning {cats['reasoning']['best_rank']}, knowledge "
            f"{cats['knowledge']['best_rank']} — this {word} the paper's finding (reasoning needs higher rank).")


def write_report(rows: list[dict], out: str | Path, energy: dict | None = None) -> dict:
    out = Path(out)
    analysis = analyse(rows)
    images = plots(rows, analysis, energy or {}, out)
    (out / "analysis.json").write_text(json.dumps(analysis, indent=1, default=str))
    (out / "summary.md").write_text(summary_markdown(analysis, images))
    return analysis
