"""The rank sweep: extract every full expert at ranks 2^0..2^k, then evaluate
(a) each expert alone with the public expert, at every rank and full size,
(b) the mixture of all experts at one uniform rank (each rank, and full size),
(c) the mixture of every expert at its best rank from (a).
Cells already in ``results.jsonl`` are not recomputed, and extracted experts are reused, so a crashed sweep resumes.
Shards (``shard=(i, n)``) split the cells of (a) and (b) between processes sharing one output folder (one GPU holds
several small evaluations at once); a last unsharded pass adds (c).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexmore.data.tokenizer import Tokenizer
from flexmore.eval.evaluate import evaluate_model
from flexmore.eval.tasks import Task
from flexmore.experts.artifact import base_hash, load_artifact
from flexmore.experts.extract import save_lowrank
from flexmore.experts.merge import merge, reroute
from flexmore.experts.refit import save_refit
from flexmore.experts.router import TuneConfig, tune_router
from flexmore.model import count_params
from flexmore.model.experts import PROJECTIONS
from flexmore.store.modeldir import latest_checkpoint, load_model
from flexmore.study.report import FULL, SECONDARY_METRICS, mean_se, pick_best
from flexmore.study.results import ResultStore


def sweep_ranks(max_exp: int, d_model: int, d_ffn: int) -> list[int]:
    """2^0 .. 2^max_exp, capped below min(d, f) (at which extraction is exact: the full expert)."""
    if max_exp < 0:
        raise ValueError(f"max rank exponent {max_exp} must be >= 0")
    return [2**i for i in range(max_exp + 1) if 2**i < min(d_model, d_ffn)]


@dataclass
class Expert:
    name: str
    domain: str
    path: Path


@dataclass
class RouterFit:
    """A mixture of several experts gets its router tuned (FlexOlmo's step after merging) on each owner's sample."""

    samples: dict[str, torch.Tensor]  # "public" and each expert's name -> (n, T + 1) windows
    tune: TuneConfig = field(default_factory=TuneConfig)


def build_mixture(base_path: Path, artifacts: dict[str, Path], fit: RouterFit | None, device: torch.device,
                  context: str = "token"):
    """Merge ``artifacts`` (expert name -> artifact folder, any rank) onto the base; when there is more than one
    expert, tune the router (with a ``fit``) and route by ``context`` (ModelConfig.route_context)."""
    model = merge(base_path, list(artifacts.values()))
    if fit is not None and len(artifacts) > 1:
        merged_names = model.cfg.expert_names[1:]  # the artifacts' own names (e.g. math-r8)
        samples = {"public": fit.samples["public"], **{m: fit.samples[e] for e, m in zip(artifacts, merged_names)}}
        tune_router(model, samples, fit.tune, device, log=None)
    if routing_label(artifacts, context) != "token":
        model = reroute(model, context=context)
    return model.to(device)


def has_lowrank(choice: dict) -> bool:
    return any(str(r) != FULL for r in choice.values())


def router_label(choice: dict, fit: RouterFit | None, refit: bool = False) -> str:
    """How a cell's router was made: "tuned" for a mixture of several experts with a fit; "refit" when its low-rank
    experts' rows were re-fitted by their owners after compression (``save_refit``); else "merged"."""
    if fit is not None and len(choice) > 1:
        return "tuned"
    return "refit" if refit and has_lowrank(choice) else "merged"


def routing_label(choice: dict, context: str) -> str:
    """A cell's routing rule: ``context`` for a mixture of several experts; one expert (a two-expert model, where
    every rule gives the same output) is routed by token."""
    return context if len(choice) > 1 else "token"


def how_routed(choice: dict, fit: RouterFit | None, context: str, refit: bool = False) -> dict[str, str]:
    """A cell's ``router`` and ``routing`` columns."""
    return {"router": router_label(choice, fit, refit), "routing": routing_label(choice, context)}


def lowrank_path(out: Path, name: str, rank: int, refit: bool = False) -> Path:
    """Where the sweep keeps an expert extracted at ``rank`` (and its owner-refitted version)."""
    return Path(out) / ("lowrank-refit" if refit else "lowrank") / f"{name}-r{rank}"


def cell_key(design: str, choice: dict, fit: RouterFit | None, context: str = "token", refit: bool = False) -> str:
    tuned = "+tuned" if router_label(choice, fit) == "tuned" else ""
    if refit and has_lowrank(choice):  # a tuned mixture starts from the refitted rows too
        tuned += "+refit"
    routed = "" if routing_label(choice, context) == "token" else f"+{context}"
    return design + tuned + routed + ":" + "+".join(f"{n}@{r}" for n, r in choice.items())


def selection_stats(rows: list[dict], domain: str) -> tuple[float, float | None]:
    """How well a cell serves a domain, with its standard error: the mean score on that domain's tasks, else minus
    its validation loss."""
    tasks = [r for r in rows if r.get("domain") == domain and r["metric"] not in ("loss",) + SECONDARY_METRICS]
    losses = [r for r in rows if r["task"] == f"val/{domain}"]
    if not tasks and not losses:
        raise ValueError(f"no task or validation loss measures domain {domain!r}; add one to choose its best rank")
    return mean_se(tasks or losses)


def selection_score(rows: list[dict], domain: str) -> float:
    return selection_stats(rows, domain)[0]


def run_sweep(base_path: str | Path, expert_paths: list[str | Path], max_exp: int, tasks: list[Task], val_sets: dict,
              tokenizer: Tokenizer, device: torch.device, out: str | Path, fit: RouterFit | None = None,
              log=print, shard: tuple[int, int] | None = None, context: str = "token",
              refit: RouterFit | None = None) -> list[dict]:
    """``refit``: each extracted expert's router row and bias are re-fitted on its owner's sample and the public
    sample of ``refit.samples`` (``refit_router``) before any cell uses it."""
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard {shard[0]}/{shard[1]}: allowed i/n with 0 <= i < n")
    out = Path(out)
    base_path = latest_checkpoint(base_path)
    base = load_model(base_path)
    cfg = base.cfg
    bhash = base_hash(base.state_dict())
    ranks = sweep_ranks(max_exp, cfg.d_model, cfg.d_ffn)
    public = {f"layers.{i}.{p}.weight": base.state_dict()[f"blocks.{i}.ffn.experts.0.{p}.weight"]
              for i in range(cfg.n_layers) for p in PROJECTIONS}
    experts = []
    for p in expert_paths:
        _, man = load_artifact(p)
        if man.kind != "full":
            raise ValueError(f"the sweep extracts from full experts; {p} is {man.kind}")
        if man.base_hash != bhash:
            raise ValueError(f"expert artifact {p} was trained against another base than {base_path}")
        experts.append(Expert(man.name, man.domain.split(",")[0], Path(p)))
    store = ResultStore(out / "results.jsonl")
    total = len(experts) * (len(ranks) + 1) + len(ranks) + 2
    timing = {"t0": time.perf_counter(), "new": 0}

    def artifact(e: Expert, rank) -> Path:
        if rank == FULL:
            return e.path
        plain, path = lowrank_path(out, e.name, rank), lowrank_path(out, e.name, rank, refit is not None)
        if not plain.is_dir():  # published whole (atomic); a shard that finished it first is kept
            save_lowrank(plain, public, *load_artifact(e.path), cfg.n_layers, [rank], device=device)
        if refit is not None and not path.is_dir():
            save_refit(base_path, plain, path, refit.samples[e.name], refit.samples["public"], refit.tune, device)
        return path

    order = iter(range(total))

    def cell(design: str, choice: dict[str, int | str]) -> None:
        key = cell_key(design, choice, fit, context, refit is not None)
        mine = shard is None or next(order) % shard[1] == shard[0]
        if key in store.done or not mine:
            return
        by_name = {e.name: e for e in experts}
        model = build_mixture(base_path, {n: artifact(by_name[n], r) for n, r in choice.items()}, fit, device, context)
        c = count_params(model)
        labels = {"model": key, "design": design, "mixture": "+".join(choice), "expert": "+".join(choice),
                  "rank": next(iter(set(choice.values()))) if len(set(choice.values())) == 1 else "mixed",
                  "ranks": dict(choice), "params": c.total, "active_params": c.active,
                  **how_routed(choice, fit, context, refit is not None)}
        store.add(key, evaluate_model(model, tokenizer, tasks, val_sets, device, labels))
        timing["new"] += 1
        if log:
            per = (time.perf_counter() - timing["t0"]) / timing["new"]
            left = total - len(store.done)
            log(f"sweep cell {len(store.done)}/{total} {key}: {per:.0f}s per cell, ~{left * per / 60:.1f} min left")

    for e in experts:  # (a)
        for r in ranks + [FULL]:
            cell("a", {e.name: r})
    for r in ranks + [FULL]:  # (b)
        cell("b", {e.name: r for e in experts})
    if shard is None:  # (c) needs every (a) cell
        cell("c", best_ranks(store.rows, experts))
    return store.rows


def best_ranks(rows: list[dict], experts: list[Expert]) -> dict[str, int | str]:
    best = {}
    for e in experts:
        cells: dict[str, list[dict]] = {}
        for r in rows:
            if r.get("design") == "a" and r["mixture"] == e.name:
                cells.setdefault(str(r["rank"]), []).append(r)
        if not cells:
            raise ValueError(f"no design (a) results for expert {e.name!r}")
        choice = pick_best({k: selection_stats(rs, e.domain) for k, rs in cells.items()})  # smaller within noise
        best[e.name] = int(choice) if choice != FULL else FULL
    return best
