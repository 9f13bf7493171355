"""The study: regression, allocation, a resumable sweep, and the whole recipe at toy scale."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from flexmore.study.allocate import allocate
from flexmore.study.regression import fit_log2, mean_ci, t_quantile
from flexmore.study.report import FULL
from flexmore.study.results import ResultStore

REPO = Path(__file__).resolve().parents[1]


def test_regression_recovers_a_planted_slope():
    rng = random.Random(0)
    ranks = [2**i for i in range(10)] * 8
    scores = [0.3 + 0.05 * i + rng.gauss(0, 0.02) for i in [r.bit_length() - 1 for r in ranks]]
    fit = fit_log2(ranks, scores)
    assert fit.slope_lo < 0.05 < fit.slope_hi and abs(fit.slope - 0.05) < 0.005
    assert abs(fit.intercept - 0.3) < 0.02 and fit.r2 > 0.9
    flat = fit_log2(ranks, [0.5 + rng.gauss(0, 0.02) for _ in ranks])
    assert flat.slope_lo < 0 < flat.slope_hi
    assert abs(t_quantile(0.975, 10) - 2.228) < 2e-3 and abs(t_quantile(0.975, 3) - 3.182) < 3e-2


def test_mean_interval_is_the_t_interval():
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # sd sqrt(2.5), t(0.975, 4) = 2.776 from tables
    assert mean == 3.0 and abs(hi - mean - 2.776 * 2.5**0.5 / 5**0.5) < 5e-3 and abs((hi - mean) - (mean - lo)) < 1e-12
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        mean_ci([0.5])


def test_allocator_respects_the_budget_and_is_optimal():
    rng = random.Random(1)
    options = {f"e{i}": {r: (r * 100 + rng.randint(0, 50), rng.random() + 0.1 * r.bit_length()) for r in (1, 2, 4, 8, 16)}
               for i in range(4)}
    for budget in (500, 2000, 4000, 10_000):
        choice, used, value = allocate(options, budget)
        assert used <= budget and used == sum(options[e][r][0] for e, r in choice.items())
        best = max((sum(options[e][r][1] for e, r in zip(options, combo)), combo)
                   for combo in itertools.product(*[list(o) for o in options.values()])
                   if sum(options[e][r][0] for e, r in zip(options, combo)) <= budget)
        assert value == pytest.approx(best[0])
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate(options, 10)


def test_result_store_keeps_finished_cells_and_drops_a_torn_one(tmp_path):
    s = ResultStore(tmp_path / "r.jsonl")
    s.add("a:x@1", [{"score": 1.0}, {"score": 2.0}])
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write(json.dumps({"_cell": "a:x@2", "score": 3.0}) + "\n" + '{"_cell": "a:x@2", "sco')  # crash mid-cell
    again = ResultStore(tmp_path / "r.jsonl")
    assert again.done == {"a:x@1"} and [r["score"] for r in again.rows] == [1.0, 2.0]


def test_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    """Base + 2 tiny experts; the sweep runs; a second run evaluates nothing; a lost cell is recomputed alone."""
    from conftest import tiny_config

    from flexmore.data import ByteTokenizer, TokenStream, embedded_path, eval_batches
    from flexmore.eval.tasks import embedded_tasks
    from flexmore.experts.training import train_expert
    from flexmore.study import sweep as sweep_mod
    from flexmore.train.loop import train

    train(tiny_config(tmp_path / "base", train={"steps": 10}))
    arts = []
    for name in ("math", "facts"):
        cfg = tiny_config(tmp_path / name, data={"domains": [name]}, train={"steps": 4})
        cfg.expert.base, cfg.expert.name, cfg.expert.router_init_batches = str(tmp_path / "base" / "run"), name, 1
        arts.append(train_expert(cfg).artifact)
    tok = ByteTokenizer()
    val = {"math": eval_batches(TokenStream([embedded_path("math", "val", tok, 20_000, 0)]), 32, 4, 1)}
    tasks = [t for t in embedded_tasks(2)]
    for t in tasks:
        t.max_new_tokens = 4
    calls = []
    real = sweep_mod.evaluate_model
    monkeypatch.setattr(sweep_mod, "evaluate_model", lambda *a, **k: calls.append(a[-1]["model"]) or real(*a, **k))
    args = (tmp_path / "base" / "run", arts, 2, tasks, val, tok, __import__("torch").device("cpu"), tmp_path / "sweep")
    rows = sweep_mod.run_sweep(*args)
    ranks = sweep_mod.sweep_ranks(2, 64, 192)
    assert ranks == [1, 2, 4]
    assert len(calls) == 2 * 4 + 4 + 1  # (a) 2 experts x (3 ranks + full), (b) 4, (c) 1
    assert {r["design"] for r in rows} == {"a", "b", "c"}
    calls.clear()
    assert sweep_mod.run_sweep(*args) == rows and calls == []
    # lose the last finished cell (as if the process died while writing it): only that cell runs again
    lines = (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()
    last_cell = json.loads(lines[-1])["_cell"]
    (tmp_path / "sweep" / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    sweep_mod.run_sweep(*args)
    assert calls == [last_cell]
    # shards into one new folder: disjoint (a)/(b) cells that together are all of them, then one pass adds (c) only
    sharded = (*args[:-1], tmp_path / "sharded")
    done = []
    for i in range(2):
        calls.clear()
        sweep_mod.run_sweep(*sharded, shard=(i, 2))
        done.append(set(calls))
    assert done[0] and done[1] and not done[0] & done[1]
    assert done[0] | done[1] == {r["model"] for r in rows if r["design"] in ("a", "b")}
    calls.clear()
    again = sweep_mod.run_sweep(*sharded)
    assert [c.split(":")[0] for c in calls] == ["c"]
    key = lambda r: (r["model"], r["task"], r["metric"])  # noqa: E731
    assert {key(r): r["score"] for r in again} == {key(r): r["score"] for r in rows}
    with pytest.raises(ValueError, match="shard 2/2"):
        sweep_mod.run_sweep(*sharded, shard=(2, 2))
    # owners re-fit their compressed experts' router rows: every low-rank cell uses the refitted artifact, full
    # ones the trained expert; only rows and biases differ from the plain extraction
    import torch

    from flexmore.experts.artifact import load_artifact
    from flexmore.experts.router import TuneConfig, load_sample

    samples = {n: load_sample(f"embedded:{n}", tok, 32, 8) for n in ("public", "math", "facts")}
    refit = sweep_mod.RouterFit(samples, TuneConfig(steps=3, micro_batch=4))
    calls.clear()
    rows = sweep_mod.run_sweep(*args[:-1], tmp_path / "refit", refit=refit)
    low = [r for r in rows if r["design"] == "a" and r["rank"] != "full"]
    assert low and all(r["router"] == "refit" and r["model"].startswith("a+refit:") for r in low)
    assert all(r["router"] == "merged" for r in rows if r["design"] == "a" and r["rank"] == "full")
    plain, man = load_artifact(sweep_mod.lowrank_path(tmp_path / "refit", "math", 2))
    tuned, tman = load_artifact(sweep_mod.lowrank_path(tmp_path / "refit", "math", 2, refit=True))
    changed = {k for k in plain if not torch.equal(plain[k], tuned[k])}
    assert changed and all(k.endswith((".router", ".bias")) for k in changed)
    assert tman.training["router_refit"]["steps"] == 3 and "router_refit" not in man.training
    # a resumed sweep never takes a tuned mixture of refitted experts for one of plain ones
    pair = {"math": 2, "facts": 2}
    assert sweep_mod.cell_key("b", pair, refit, "posterior", True) != sweep_mod.cell_key("b", pair, refit, "posterior")


def test_study_recipe_end_to_end_at_toy_scale(tmp_path):
    env = {**os.environ, "SIZE": "tiny", "OUT": str(tmp_path / "study"), "BASE_STEPS": "20", "EXPERT_STEPS": "6",
           "SEQ": "32", "MB": "4", "CHARS": "100000", "N": "2", "MAXEXP": "2", "VALB": "1", "PARAM_BUDGET": "20000",
           "PARALLEL": "1", "SHARDS": "2", "REFIT_STEPS": "2", "PYTHON": sys.executable}  # not on PATH: found
    done = subprocess.run(["bash", str(REPO / "launch" / "study.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    sweep = tmp_path / "study" / "sweep"
    for f in ("summary.md", "score_vs_rank.png", "params_vs_score.png", "energy.png", "table.csv", "analysis.json"):
        assert (sweep / f).is_file(), f
    rows = json.loads((sweep / "table.json").read_text())
    assert {r["design"] for r in rows} == {"a", "b", "c", "alloc"}
    # every mixture of several experts was routed by posterior with its owners' own routers (nothing tuned); single
    # experts keep their own router (a two-expert model: every rule is the same); every compressed expert's row was
    # re-fitted by its owner first, and only full-size experts keep the rows they were trained with
    def compressed(r):
        return any(v != "full" for v in r["ranks"].values())
    assert {r["router"] for r in rows if compressed(r)} == {"refit"}
    assert {r["router"] for r in rows if not compressed(r)} == {"merged"}
    assert {r["routing"] for r in rows if r["design"] != "a"} == {"posterior"}
    assert {r["routing"] for r in rows if r["design"] == "a"} == {"token"}
    assert all("+posterior:" in r["model"] and "+tuned" not in r["model"] for r in rows if r["design"] != "a")
    assert set(json.loads((sweep / "analysis.json").read_text())["categories"]) >= {"reasoning", "knowledge", "loss"}
    alloc = [r for r in rows if r["design"] == "alloc"][0]
    assert alloc["expert_params"] <= 20000


def test_sweep_refuses_an_unknown_routing_rule_before_any_work(tmp_path, capsys):
    from flexmore.cli.sweep import main

    with pytest.raises(SystemExit) as e:
        main(["--base", str(tmp_path / "none"), "--experts", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
              "--route-context", "document"])
    assert e.value.code == 2 and "invalid choice: 'document'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["--base", str(tmp_path / "none"), "--experts", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--refit-steps", "-1"]) == 2
    assert "--refit-steps=-1 must be >= 0" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["--base", str(tmp_path / "none"), "--experts", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--refit-steps", "5", "--refit-route-loss", "-1"]) == 2
    assert "route_loss=-1.0 must be a finite number >= 0" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_analysis_counts_each_expert_on_its_own_domain_and_reads_the_verdict():
    """Planted: the math expert's reasoning score peaks at rank 64, the facts expert's knowledge score at rank 4.
    Rows that would mislead if counted (an expert on the other domain's task, acc_norm) are left out."""
    from flexmore.study.report import analyse, paper_verdict

    def row(expert, rank, task, category, domain, score, metric="acc"):
        return {"design": "a", "expert": expert, "rank": rank, "task": task, "category": category, "domain": domain,
                "metric": metric, "score": score, "params": 1, "model": f"a:{expert}@{rank}"}

    rows = []
    for e in range(9):
        r = 2**e
        rows += [row("math", r, "math_mc", "reasoning", "math", 0.3 + 0.05 * min(e, 6)),
                 row("facts", r, "facts_mc", "knowledge", "facts", 0.6 - 0.03 * abs(e - 2)),
                 row("math", r, "facts_mc", "knowledge", "facts", 0.25 + 0.1 * e),  # another domain: not counted
                 row("facts", r, "facts_mc", "knowledge", "facts", 1.0, metric="acc_norm")]  # secondary metric
    a = analyse(rows)
    assert a["categories"]["reasoning"]["best_rank"] == "64"
    assert a["categories"]["knowledge"]["best_rank"] == "4"
    assert a["categories"]["reasoning"]["fit"]["slope"] > 0
    assert "agrees with the paper" in paper_verdict(a)
    rows = [dict(r, score=1 - r["score"]) if r["category"] == "reasoning" else r for r in rows]
    assert "contradicts" in paper_verdict(analyse(rows))
    rows = [dict(r, score=0.25) if r["category"] == "knowledge" else r for r in rows]
    assert "No verdict: knowledge scores do not change with rank" in paper_verdict(analyse(rows))


def test_best_rank_prefers_the_smaller_rank_within_the_noise_and_verdicts_need_an_interval(tmp_path):
    """500 items per task: 0.40 at rank 2 and 0.42 at rank 64 differ by less than their noise (SE ~0.022 each), so
    the best rank is 2; the slope difference between categories whose scores are both noise is 'not resolved'; the
    best-rank mixture against full size gets a verdict only where its interval excludes zero (or lies within the
    match margin); analysis.json is valid JSON when a fit has no R² (NaN)."""
    from flexmore.study.report import analyse, mixture_verdict, paper_verdict, pick_best, write_report

    assert pick_best({"2": (0.40, 0.022), "64": (0.42, 0.022), FULL: (0.41, 0.022)}) == "2"
    assert pick_best({"2": (0.30, 0.01), "64": (0.42, 0.01), FULL: (0.42, 0.01)}) == "64"
    assert pick_best({"2": (-1.30, None), "64": (-1.20, None)}) == "64"  # losses: no noise known, the top one

    def row(design, expert, rank, task, category, score, n=500, params=1):
        return {"design": design, "expert": expert, "mixture": expert, "rank": rank, "task": task,
                "category": category, "domain": expert, "metric": "acc", "score": score, "n": n, "params": params,
                "model": f"{design}:{expert}@{rank}"}

    rng = random.Random(3)
    rows = [row("a", e, 2**i, f"{e}_mc", cat, 0.5 + rng.gauss(0, 0.02))
            for i in range(8) for e, cat in (("math", "reasoning"), ("facts", "knowledge"))]
    rows += [row("a", "code", 2**i, "val/code", "loss", 1.0 - 0.01 * i) | {"metric": "loss"} for i in range(8)]
    a = analyse(rows)
    assert "Not resolved at this size (slope difference reasoning - knowledge" in paper_verdict(a)
    unfinished = [r for r in rows if not (r["category"] == "knowledge" and r["rank"] > 16)]
    assert "No verdict: the categories were measured at different ranks" in paper_verdict(analyse(unfinished))
    assert a["categories"]["loss"]["best_rank"] == "128"  # losses: the lowest one
    for best, full, want in ((0.50, 0.42, "Agrees with the paper: the best-rank mixture is better"),
                             (0.40, 0.48, "Contradicts the paper"), (0.45, 0.44, "Not resolved at this size")):
        mix = [row("c", "math+facts", "mixed", "math_mc", "reasoning", best, n=2000, params=30) | {"ranks": {}},
               row("b", "math+facts", FULL, "math_mc", "reasoning", full, n=2000, params=100)]
        assert want in mixture_verdict(analyse(rows + mix)), (best, full)
    mix = [row("c", "m", "mixed", "math_mc", "reasoning", 0.44, n=5000, params=30),
           row("b", "m", FULL, "math_mc", "reasoning", 0.44, n=5000, params=100)]
    matched = mixture_verdict(analyse(rows + mix))
    assert "they match within 0.03" in matched and "is better is not resolved at this size" in matched
    flat = [row("a", "math", 2**i, "math_mc", "reasoning", 0.5) for i in range(4)]  # R² is NaN
    (tmp_path / "rep").mkdir()
    write_report(flat, tmp_path / "rep")
    json.loads((tmp_path / "rep" / "analysis.json").read_text(), parse_constant=lambda c: pytest.fail(c))
