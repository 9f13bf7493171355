"""The study's analysis: score vs log2(rank) per task and per category (OLS with 95% CIs), best ranks, the best-rank
mixture against the full-size mixture, plots (PNG) and a markdown summary."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from flexmore.study.regression import fit_log2
from flexmore.study.results import finite

FULL = "full"


Z95 = 1.959964
MATCH_MARGIN = 0.03  # task-score difference within which two mixtures "match" (what 500 items per task resolve)


def higher_is_better(row: dict) -> float:
    """Validation losses enter as minus the loss, so every score grows with quality."""
    return -row["score"] if row["metric"] == "loss" else row["score"]


def score_se(row: dict) -> float | None:
    """The standard error of a row's score: binomial over its ``n`` items for a task; None where unknown (a validation
    loss, or a task row written before item counts were kept)."""
    if row["metric"] == "loss" or not row.get("n"):
        return None
    p = row["score"]
    return math.sqrt(max(p * (1 - p), 0.0) / row["n"])


def mean_se(rows: list[dict]) -> tuple[float, float | None]:
    """The mean score of rows (higher is better) and its standard error (None if any row's is unknown)."""
    if not rows:
        return float("nan"), None
    ses = [score_se(r) for r in rows]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / len(rows)
    return sum(higher_is_better(r) for r in rows) / len(rows), se


def rank_order(rank: str) -> float:
    return math.inf if str(rank) == FULL else float(rank)


def pick_best(stats: dict[str, tuple[float, float | None]]) -> str:
    """The smallest rank (full size counts as the largest) whose mean is not below the top mean by more than the 95%
    noise of their difference: a larger rank wins only where the data say it is better. Unknown noise counts as 0."""
    top = max(stats, key=lambda k: stats[k][0])
    m0, s0 = stats[top]
    ok = [k for k, (m, s) in stats.items() if m >= m0 - Z95 * math.hypot(s0 or 0.0, s or 0.0)]
    return min(ok, key=rank_order)


SECONDARY_METRICS = ("acc_norm",)  # kept in the table, left out of the analysis (one score per task)


def counts(row: dict) -> bool:
    """Whether a design (a) row measures its own expert: tasks and validation sets of another domain (another
    expert's, or the public one's) say how much the expert disturbs them, not how good it is at its own."""
    return row["metric"] not in SECONDARY_METRICS and row.get("domain") in (None, row.get("expert"))


def task_rows(rows: list[dict]) -> list[dict]:
    """The rows a mixture is compared on: its task scores, or its validation losses where it has no task."""
    primary = [r for r in rows if r["metric"] not in SECONDARY_METRICS]
    return [r for r in primary if r["metric"] != "loss"] or primary


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
        (sb, seb), (sf, sef) = mean_se(task_rows(c)), mean_se(task_rows(b_full))
        diff = {"diff": sb - sf, "ci95": None}
        if seb is not None and sef is not None:
            half = Z95 * math.hypot(seb, sef)
            diff["ci95"] = [sb - sf - half, sb - sf + half]
        out["best_vs_full"] = {
            "best_rank_mixture": c[0]["mixture"], "best_ranks": c[0].get("ranks"),
            "score_best": sb, "score_full": sf, **diff,
            "params_best": c[0]["params"], "params_full": b_full[0]["params"],
            "param_ratio": c[0]["params"] / b_full[0]["params"],
        }
    return out


def _summarise(rs: list[dict]) -> dict:
    by_rank: dict[str, list[dict]] = defaultdict(list)
    for r in rs:
        by_rank[str(r["rank"])].append(r)
    stats = {k: mean_se(v) for k, v in by_rank.items()}
    # a category pools tasks of different levels (an exact-match task at 0 beside a 4-way choice at 0.25): each task's
    # mean is taken out first (task fixed effects), so the slope and its interval measure the change with rank alone
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        by_task[r["task"]].append(higher_is_better(r))
    level = {t: sum(v) / len(v) for t, v in by_task.items()}
    numeric = [(float(r["rank"]), higher_is_better(r) - level[r["task"]]) for r in rs if str(r["rank"]) != FULL]
    res = {"mean_by_rank": {k: m for k, (m, _) in stats.items()}, "se_by_rank": {k: se for k, (_, se) in stats.items()},
           "best_rank": pick_best(stats), "top_rank": max(stats, key=lambda k: stats[k][0])}
    if len({x for x, _ in numeric}) >= 2 and len(numeric) >= 3:
        fit = fit_log2([x for x, _ in numeric], [y for _, y in numeric])
        res["fit"] = {"slope": fit.slope, "ci95": [fit.slope_lo, fit.slope_hi], "se": fit.se, "r2": fit.r2,
                      "n": fit.n}
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
    scored = {k: task_rows(rs) for k, rs in cells.items()}
    on_tasks = all(rs and rs[0]["metric"] != "loss" for rs in scored.values())
    pts = sorted((rs[0]["params"], mean_se(scored[k])[0], k) for k, rs in cells.items())
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12)
    for x, y, key in pts:
        ax.annotate(key.replace("+tuned", ""), (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points")
    front, best = [], float("-inf")
    for p in pts:
        if p[1] > best:
            front.append(p)
            best = p[1]
    ax.plot([p[0] for p in front], [p[1] for p in front], color="C3", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (total)")
    ax.set_ylabel("mean task accuracy" if on_tasks else "minus mean validation loss")
    ax.set_title("Every sweep cell: size against quality (label: design:expert@rank)")
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
    lines = ["# FlexMoRE rank sweep", "",
             "Scores: task accuracy; validation losses enter as minus the loss, so higher is better everywhere. Best "
             "rank: the smallest rank within the 95% noise of the top-scoring one (top: the highest mean, noise or "
             "not).", "",
             "| task / category | best rank | top rank | slope per doubling of rank (95% CI) | R² |", "|---|---|---|---|---|"]
    for kind in ("categories", "tasks"):
        for name, s in analysis[kind].items():
            fit = s.get("fit")
            slope = f"{fit['slope']:+.4f} [{fit['ci95'][0]:+.4f}, {fit['ci95'][1]:+.4f}]" if fit else "n/a"
            label = f"**{name}**" if kind == "categories" else name
            r2 = f"{fit['r2']:.2f}" if fit and fit["r2"] == fit["r2"] else ""
            lines.append(f"| {label} | {s['best_rank']} | {s['top_rank']} | {slope} | {r2} |")
    for verdict in (paper_verdict(analysis), mixture_verdict(analysis)):
        if verdict:
            lines += ["", verdict]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def interval(lo: float, hi: float) -> str:
    return f"[{lo:+.4f}, {hi:+.4f}]"


def paper_verdict(analysis: dict) -> str | None:
    """The paper's first finding, checked: reasoning wants a higher rank than knowledge, read as reasoning's score
    growing faster with rank (slope per doubling) than knowledge's; a verdict only where the 95% interval of the
    difference excludes zero."""
    cats = analysis["categories"]
    if "reasoning" not in cats or "knowledge" not in cats:
        return None
    head = (f"Paper finding 1 (reasoning needs a higher rank than knowledge): best rank reasoning "
            f"{cats['reasoning']['best_rank']}, knowledge {cats['knowledge']['best_rank']}.")
    flat = [c for c in ("reasoning", "knowledge")
            if max(cats[c]["mean_by_rank"].values()) == min(cats[c]["mean_by_rank"].values())]
    if flat:
        return f"{head} No verdict: {' and '.join(flat)} scores do not change with rank here."
    ranks = {c: sorted(cats[c]["mean_by_rank"], key=rank_order) for c in ("reasoning", "knowledge")}
    if ranks["reasoning"] != ranks["knowledge"]:
        return f"{head} No verdict: the categories were measured at different ranks {ranks} (an unfinished sweep?)."
    fr, fk = cats["reasoning"].get("fit"), cats["knowledge"].get("fit")
    if not fr or not fk:
        return f"{head} No verdict: too few ranks to fit a slope."
    d, lo, hi = slope_difference(cats)
    ci = f"slope difference reasoning - knowledge {d:+.4f}, 95% CI {interval(lo, hi)}"
    return {"above": f"{head} This agrees with the paper ({ci}).",
            "below": f"{head} This contradicts the paper ({ci})."}.get(outcome(lo, hi),
                                                                       f"{head} Not resolved at this size ({ci}).")


def slope_difference(cats: dict) -> tuple[float, float, float]:
    """Reasoning's score slope per doubling of rank minus knowledge's, and its 95% interval (the fits' own SEs)."""
    fr, fk = cats["reasoning"]["fit"], cats["knowledge"]["fit"]
    d, half = fr["slope"] - fk["slope"], Z95 * math.hypot(fr["se"], fk["se"])
    return d, d - half, d + half


def outcome(lo: float, hi: float, margin: float | None = None) -> str:
    """What a 95% interval of a difference says: "above" / "below" zero, "within" +-margin, or "unresolved"."""
    if lo > 0:
        return "above"
    if hi < 0:
        return "below"
    if margin is not None and -margin <= lo and hi <= margin:
        return "within"
    return "unresolved"


def mixture_verdict(analysis: dict) -> str | None:
    """The paper's second finding, checked: the best-rank mixture matches or beats the full-size one (the paper:
    47.18 against 45.46 at 0.32x the parameters). Matching means the 95% interval lies within +-MATCH_MARGIN."""
    b = analysis.get("best_vs_full")
    if not b:
        return None
    head = (f"Paper finding 2 (the best-rank mixture matches or beats the full-size one): best ranks "
            f"{b['best_ranks']} score {b['score_best']:.4f} with {b['params_best']:,} parameters; full size "
            f"{b['score_full']:.4f} with {b['params_full']:,} ({b['param_ratio']:.2f}x the parameters of full size).")
    if not b.get("ci95"):
        return f"{head} No verdict: no interval (validation losses only, or task item counts unknown)."
    lo, hi = b["ci95"]
    ci = f"difference {b['diff']:+.4f}, 95% CI {interval(lo, hi)}"
    return {"above": f"{head} Agrees with the paper: the best-rank mixture is better ({ci}).",
            "below": f"{head} Contradicts the paper: the best-rank mixture is worse ({ci}).",
            "within": f"{head} Agrees with the paper: they match within {MATCH_MARGIN} (the interval lies inside "
                      f"+-{MATCH_MARGIN}); whether the best-rank mixture is better is not resolved at this size ({ci})."
            }.get(outcome(lo, hi, MATCH_MARGIN), f"{head} Not resolved at this size ({ci}).")


def write_report(rows: list[dict], out: str | Path, energy: dict | None = None) -> dict:
    out = Path(out)
    analysis = analyse(rows)
    images = plots(rows, analysis, energy or {}, out)
    (out / "analysis.json").write_text(json.dumps(finite(analysis), indent=1, default=str, allow_nan=False))
    (out / "summary.md").write_text(summary_markdown(analysis, images))
    return analysis
