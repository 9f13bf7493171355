"""Does a merged mixture keep every expert's gain and the public model's quality? The measurement behind
``benchmarks/bench_mixture.py`` and the tiny end-to-end test.

A public base; for each expert recipe, experts for several domains, each trained alone against the frozen base; then,
per recipe, the merged mixture as is, with its router tuned on a small proxy mix, and (reference points) with the
nearest-centroid router and the oracle (each domain scored by its own expert's two-expert model). For each: the
validation loss per domain at the training length, gap recovery (L_base - L_mix) / (L_base - L_alone) per expert
domain, the router probability each domain's tokens give its own expert, the change in every other domain's loss when
one expert opts out, and the multiple-choice tasks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmore.config import Config, DataConfig, ExpertConfig, LoggingConfig, OptimConfig, TrainConfig
from flexmore.data import ByteTokenizer, TokenStream, embedded_path, eval_batches
from flexmore.eval.evaluate import choice_outcomes, paired_difference
from flexmore.eval.routing import routing_mass, routing_stats
from flexmore.eval.tasks import embedded_tasks
from flexmore.eval.validation import evaluate
from flexmore.experts.merge import merge, opt_out, reroute
from flexmore.experts.router import TuneConfig, centroid_router, load_sample, tune_router
from flexmore.experts.training import train_expert
from flexmore.model import load_preset
from flexmore.store.modeldir import load_model
from flexmore.study.results import finite
from flexmore.train.loop import train


@dataclass(frozen=True)
class Recipe:
    """How each owner trains its expert (the fields of ``ExpertConfig`` that the remedies set)."""

    name: str
    bias: bool = True
    bias_init: float = -1.0
    public_fraction: float = 0.0
    public_mode: str = "train"
    route_loss: float = 0.0

    def expert_fields(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


RECIPES = {
    "flexolmo": Recipe("flexolmo", bias=False),  # FlexOlmo as specified here before: the old bias was inert (b > 0)
    "bias": Recipe("bias"),
    "negatives": Recipe("negatives", bias=False, public_fraction=0.25),
    "negatives_router": Recipe("negatives_router", bias=False, public_fraction=0.25, public_mode="router"),
    "negatives+bias": Recipe("negatives+bias", public_fraction=0.25),
    "negatives+route": Recipe("negatives+route", bias=False, public_fraction=0.25, route_loss=1.0),
    "negatives_router+route": Recipe("negatives_router+route", bias=False, public_fraction=0.25, public_mode="router",
                                     route_loss=1.0),
    "negatives+route+bias": Recipe("negatives+route+bias", public_fraction=0.25, route_loss=1.0),
}


@dataclass
class Size:
    model: str
    base_steps: int
    expert_steps: int
    seq_len: int
    micro_batch: int
    train_chars: int
    eval_batches: int
    mc_items: int
    tune_steps: int
    proxy_seqs: int  # sequences each owner contributes to router tuning
    tune_lr: float = 3e-3
    base_lr: float = 1e-3
    expert_lr: float = 9e-4
    compile: bool = False
    seed: int = 0  # the base's and experts' initial weights (a repeat of the whole pipeline on the same data)


SIZES = {
    "tiny": Size("tiny", 300, 100, 128, 8, 1_000_000, 4, 100, 100, 256, tune_lr=1e-2, base_lr=3e-3, expert_lr=3e-3),
    "small": Size("small", 1500, 500, 512, 32, 32_000_000, 8, 500, 200, 1024),
}


def base_config(size: Size, run_dir: Path) -> Config:
    return Config(model=load_preset(size.model), data=DataConfig(train_chars=size.train_chars, val_domains=["public"]),
                  optim=OptimConfig(lr=size.base_lr, warmup_steps=max(1, size.base_steps // 20)),
                  train=TrainConfig(steps=size.base_steps, seq_len=size.seq_len, micro_batch=size.micro_batch,
                                    eval_every=0, progress=False, compile=size.compile, save_every=0, keep_last=1,
                                    seed=size.seed),
                  logging=LoggingConfig(mode="disabled"), run_name="base", run_dir=str(run_dir))


def expert_config(size: Size, base: Path, domain: str, recipe: Recipe, run_dir: Path) -> Config:
    """FlexOlmo's expert recipe (AdamW, no weight decay, z-loss 1e-3) plus the recipe's remedies."""
    return Config(model=load_preset(size.model),
                  data=DataConfig(domains=[domain], train_chars=size.train_chars, val_domains=["public", domain]),
                  optim=OptimConfig(lr=size.expert_lr, weight_decay=0.0, warmup_steps=max(1, size.expert_steps // 20)),
                  train=TrainConfig(steps=size.expert_steps, seq_len=size.seq_len, micro_batch=size.micro_batch,
                                    eval_every=0, progress=False, compile=size.compile, save_every=0, keep_last=1,
                                    seed=size.seed),
                  logging=LoggingConfig(mode="disabled"), run_name=f"{recipe.name}-{domain}", run_dir=str(run_dir),
                  expert=ExpertConfig(base=str(base), name=domain, **recipe.expert_fields()))


def prepare_data(size: Size, domains: list[str]) -> None:
    """Generate (or find cached) every training split the runs read: public and each domain."""
    for d in ["public", *domains]:
        embedded_path(d, "train", ByteTokenizer(), size.train_chars, 0)


def train_base(size: Size, work: Path) -> Path:
    """The public base (reused when ``work/base`` already holds its final checkpoint)."""
    run = work / "base"
    if not (run / "checkpoints" / f"step_{size.base_steps:08d}").is_dir():
        train(base_config(size, run))
    return run


def train_experts(size: Size, base: Path, recipe: Recipe, domains: list[str], work: Path) -> dict[str, Path]:
    """domain -> artifact; an expert already written is reused."""
    out = {}
    for d in domains:
        run = work / "experts" / recipe.name / d
        if not (run / "expert" / "manifest.json").is_file():
            train_expert(expert_config(size, base, d, recipe, run))
        out[d] = run / "expert"
    return out


def gap_recovery(base: float, alone: float, mix: float) -> float:
    """The share of an expert's own gain over the base that the mixture keeps (1: all of it)."""
    return (base - mix) / (base - alone) if base != alone else float("nan")


class Evaluator:
    """Validation sets, tasks and proxy samples of one size, shared by every model evaluated."""

    def __init__(self, size: Size, domains: list[str], device: torch.device, tasks: bool = True):
        self.size, self.domains, self.device = size, domains, device
        tok = ByteTokenizer()
        self.val = {d: eval_batches(TokenStream([embedded_path(d, "val", tok, 400_000, 0)]), size.seq_len,
                                    size.micro_batch, size.eval_batches) for d in ["public", *domains]}
        self.tasks = [t for t in embedded_tasks(size.mc_items) if t.kind == "choice"] if tasks else []
        # each owner's contributed sample, as flexmore-tune-router reads it
        self.samples = {d: load_sample(f"embedded:{d}", tok, size.seq_len, size.proxy_seqs) for d in ["public", *domains]}
        self.tok = tok

    def losses(self, model) -> dict[str, float]:
        return evaluate(model.to(self.device), self.val, self.device, "auto")

    def task_items(self, model) -> dict[str, str]:
        """Per task, each item's outcome as a string of 0/1 (compact in the summary; kept for paired comparisons)."""
        return {t.name: "".join("1" if r else "0" for r in choice_outcomes(model.to(self.device), self.tok, t,
                                                                          self.device)[0]) for t in self.tasks}

    def task_scores(self, model) -> dict[str, float]:
        return task_scores(self.task_items(model))

    def scored(self, model) -> dict:
        """The tasks' accuracies and their per-item outcomes."""
        items = self.task_items(model)
        return {"tasks": task_scores(items), "task_items": items}

    def routing(self, model) -> dict[str, dict[str, float]]:
        return routing_mass(routing_stats(model.to(self.device), self.val, self.device))

    def describe(self, model, base_losses: dict, alone: dict, with_opt_out: bool = True) -> dict:
        """Losses, gap recovery, own-expert routing mass, opt-out deltas and tasks of one mixture."""
        losses = self.losses(model)
        route = self.routing(model)
        own = {d: route[d].get(d, float("nan")) for d in route}  # each domain's own expert (public: the public one)
        row = {"losses": losses, "gap_recovery": {d: gap_recovery(base_losses[d], alone[d]["losses"][d], losses[d])
                                                  for d in self.domains},
               "routing_own": own, "routing": route, **self.scored(model)}
        row["tasks_vs_alone"] = tasks_vs_alone(row["task_items"], self.tasks, alone)
        if with_opt_out and len(self.domains) > 1:
            row["opt_out"], above = {}, []
            for drop in self.domains:
                rest = self.losses(opt_out(model, [drop]))
                row["opt_out"][drop] = {d: rest[d] - losses[d] for d in rest if d != drop}
                # against what each remaining domain had before it was merged: its expert alone (public: the base)
                above += [rest[d] - (base_losses[d] if d == "public" else alone[d]["losses"][d])
                          for d in rest if d != drop]
            changes = [v for ch in row["opt_out"].values() for v in ch.values()]
            row["opt_out_max_change"] = max(abs(v) for v in changes)
            row["opt_out_max_increase"] = max(changes)  # > 0: opting an expert out hurt another domain
            row["opt_out_above_alone"] = max(above)  # <= 0: after any opt-out every domain is as good as alone
        return row


def task_scores(items: dict[str, str]) -> dict[str, float]:
    return {t: o.count("1") / len(o) for t, o in items.items()}


def tasks_vs_alone(items: dict[str, str], tasks: list, alone: dict) -> dict:
    """Each task of a domain against that domain's expert alone, item by item (the goal: within 0.02 of it)."""
    out = {}
    for t in tasks:
        mine = alone.get(t.domain, {}).get("task_items", {}).get(t.name)
        if mine is not None and t.name in items:
            out[t.name] = paired_difference([c == "1" for c in items[t.name]], [c == "1" for c in mine])
    return out


# name -> (routing-loss weight, x the size's steps, probability an expert is absent from a row)
TUNINGS = {"tuned": (0.0, 1.0, 0.0), "tuned+route": (1.0, 1.0, 0.0), "tuned+route+drop": (1.0, 1.0, 0.25)}
# routings evaluated besides each tuned mixture's own (every expert, unrenormalised): name -> merge.reroute's arguments
ROUTINGS = {"top1": {"top_k": 1, "renormalize": True}, "top2": {"top_k": 2, "renormalize": True},
            "prefix": {"context": "prefix"}, "sequence": {"context": "sequence"},
            "likelihood": {"context": "likelihood"}, "posterior": {"context": "posterior"}}


def evaluate_recipe(ev: Evaluator, base: Path, artifacts: dict[str, Path], base_losses: dict,
                    centroid: bool = False, tunings: dict[str, tuple[float, float, float]] = TUNINGS,
                    routings: dict[str, dict] | None = None) -> tuple[dict, dict]:
    """(alone: domain -> its two-expert model's losses and tasks, mixtures: name -> description; ``name@routing``:
    the merged or a tuned mixture evaluated with one of ``routings``)."""
    alone = {}
    for d, art in artifacts.items():
        m = merge(base, [art])
        alone[d] = {"losses": ev.losses(m), **ev.scored(m), "routing": ev.routing(m)}
    mixtures = {}

    def rerouted(name: str, model) -> None:
        for rname, rule in (routings or {}).items():
            mixtures[f"{name}@{rname}"] = {**ev.describe(reroute(model, **rule), base_losses, alone),
                                           "routing_rule": rule}

    merged = merge(base, [artifacts[d] for d in ev.domains])
    mixtures["merged"] = ev.describe(merged, base_losses, alone)
    rerouted("merged", merged)  # the owners' own router rows: a pair (public, e) is e's two-expert model as trained
    for name, (route_loss, steps, drop) in tunings.items():
        tuned = merge(base, [artifacts[d] for d in ev.domains])
        tc = TuneConfig(steps=round(ev.size.tune_steps * steps), lr=ev.size.tune_lr, micro_batch=ev.size.micro_batch,
                        route_loss=route_loss, drop=drop)
        info = tune_router(tuned, ev.samples, tc, ev.device, log=None)
        mixtures[name] = {**ev.describe(tuned, base_losses, alone), "tuning": info}
        rerouted(name, tuned)
    if centroid:
        c = merge(base, [artifacts[d] for d in ev.domains])
        centroid_router(c, ev.samples, ev.device)
        mixtures["centroid"] = ev.describe(c, base_losses, alone, with_opt_out=False)
    return alone, mixtures


def oracle(base_losses: dict, alone: dict, domains: list[str]) -> dict:
    """Each domain scored by its own expert's two-expert model, public by the base."""
    losses = {"public": base_losses["public"], **{d: alone[d]["losses"][d] for d in domains}}
    return {"losses": losses, "gap_recovery": {d: 1.0 for d in domains}}


def run(size: Size, recipes: list[Recipe], domains: list[str], work: Path, device: torch.device,
        default: str, tasks: bool = True, centroid_for: str | None = None, out: Path | None = None,
        tunings: dict[str, tuple[float, float, float]] = TUNINGS,
        routings: dict[str, dict] | None = None) -> dict:
    """Everything, in one process: the summary (keys ``base``, ``alone``, ``mixtures``, ``default``), also written
    to ``out`` after each recipe (a cut run keeps what it finished)."""
    base = train_base(size, work)
    ev = Evaluator(size, domains, device, tasks=tasks)
    base_model = load_model(base)
    base_losses = ev.losses(base_model)
    summary = {"base": {"losses": base_losses, "tasks": ev.task_scores(base_model)}, "alone": {}, "mixtures": {},
               "default": default, "size": dataclasses.asdict(size), "domains": domains,
               "recipes": {r.name: r.expert_fields() for r in recipes}}
    for r in recipes:
        arts = train_experts(size, base, r, domains, work)
        alone, mixes = evaluate_recipe(ev, base, arts, base_losses, centroid=r.name == centroid_for, tunings=tunings,
                                       routings=routings)
        summary["alone"][r.name] = alone
        for k, v in mixes.items():
            summary["mixtures"][f"{r.name}/{k}"] = v
        summary["mixtures"][f"{r.name}/oracle"] = oracle(base_losses, alone, domains)
        if out is not None:
            write_summary(summary, out)
    return summary


def write_summary(summary: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(summary), indent=1, allow_nan=False, default=lambda v: None))
    return path


def table(summary: dict) -> str:
    """The markdown table: each mixture x (losses, gap recoveries, own-expert routing mass, opt-out, tasks)."""
    doms = summary["domains"]
    head = (["mixture"] + [f"val/{d}" for d in ["public", *doms]] + [f"gap {d}" for d in doms]
            + [f"route {d}" for d in ["public", *doms]] + ["opt-out \\|Δ\\|", "opt-out worst +", "opt-out vs alone", "math_mc",
                                                               "facts_mc"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v):
        return "—" if v is None or v != v else f"{v:.3f}"

    def add(name, row):
        cells = [name] + [fmt(row["losses"].get(d)) for d in ["public", *doms]]
        cells += [fmt(row.get("gap_recovery", {}).get(d)) for d in doms]
        cells += [fmt(row.get("routing_own", {}).get(d)) for d in ["public", *doms]]
        cells += [fmt(row.get("opt_out_max_change")), fmt(row.get("opt_out_max_increase")),
                  fmt(row.get("opt_out_above_alone")),
                  fmt(row.get("tasks", {}).get("math_mc")),
                  fmt(row.get("tasks", {}).get("facts_mc"))]
        lines.append("| " + " | ".join(cells) + " |")

    add("base", summary["base"])
    for name, row in summary["mixtures"].items():
        add(name, row)
    return "\n".join(lines)
