"""FlexDeMo against AdamW at the same model, data, tokens and schedule shape: does it reach AdamW's loss, and with how
many bytes across nodes?

Each optimizer at each learning rate of a small sweep done in the same run; R replicas ("nodes", one process each,
gloo on CPU or NCCL on a GPU each) at the same global batch; data that the run sees at most about once (the epochs
are reported). Per R: the best learning rate of each, their final and best validation losses (mean over the
domains, at the training length), the ratio, FlexDeMo's bytes sent per step across nodes and a dense bf16
all-reduce's. Writes summary.json (top-level keys for the first R: adamw, flexdemo, ratio, bytes_per_step,
dense_bf16_bytes_per_step, settings; every R under by_replicas), table.md and curves.png.

    python benchmarks/bench_parity.py --size tiny --replicas 1 2 4 --out outputs/parity-tiny      # CPU
    python benchmarks/bench_parity.py --size tiny-long --replicas 1 --jobs 2 --out outputs/parity-tiny-long  # CPU, 10x
    python benchmarks/bench_parity.py --size small --replicas 1 --jobs 6 --out $OUT/parity        # one GPU
    python benchmarks/bench_parity.py --size small-long --replicas 1 --jobs 4 --out $OUT/parity-long
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_demo_comm: bytes for the goal's layout

from flexdemo.config import DEMO_WIRE  # noqa: E402

DOMAINS = ["public", "code", "math", "facts"]
# FlexDeMo's update rules compared (name -> flexdemo.DeMoConfig fields and optim settings); "flexdemo" is the default
# settings (since 2026-12-04 the coefficient sign with weight decay 0.1; since 2026-12-05 with 2-bit values and
# Elias-Fano indices; the variants below keep DeMo's wire, DEMO_WIRE); "flexdemo-direct" DeMo's direct step without
# weight decay, the default before, which the variants named before then vary; those with another base step ran
# without weight decay too (NO_WD)
NO_WD = {"weight_decay": 0.0}
DIRECT = {"base_step": "direct", **NO_WD}
PRE_ADAM = {**DIRECT, "precondition": "adam", "sign": False, "weight_decay": 0.1}  # each replica's own Adam update sent
VARIANTS = {"adamw": None, "flexdemo": {}, "flexdemo-direct": DIRECT, "flexdemo+adam": {**NO_WD, "base_step": "adam"},
            "flexdemo+adam+raw": {**NO_WD, "base_step": "adam", "sign": False},
            # diagnostics: less compression
            "flexdemo-k512": {**DIRECT, "topk": 512}, "flexdemo-k4096": {**DIRECT, "topk": 4096},
            # a check of the machinery: everything sent, no momentum, fp32 values: Adam (no weight decay, no bias
            # correction) on the gradient itself, through the DCT and back
            "flexdemo+adam-all": {**NO_WD, "base_step": "adam", "sign": False, "topk": 4096, "beta": 0.0,
                                  "value_dtype": "fp32"},
            "flexdemo-b0.99": {**DIRECT, "beta": 0.99}, "flexdemo-b0.9": {**DIRECT, "beta": 0.9},
            "flexdemo+lion": {**NO_WD, "base_step": "lion", "sign": False, "adam_betas": (0.9, 0.99)},
            # fewer bytes: quantised values (codes + a bf16 scale per chunk, the error kept in the momentum), smaller k
            "flexdemo-q4": {**DIRECT, "value_bits": 4}, "flexdemo-q2": {**DIRECT, "value_bits": 2},
            "flexdemo-k16-q4": {**DIRECT, "topk": 16, "value_bits": 4}, "flexdemo-k16": {**DIRECT, "topk": 16},
            "flexdemo-k64": {**DIRECT, "topk": 64}, "flexdemo-k16-q2": {**DIRECT, "topk": 16, "value_bits": 2},
            "flexdemo-k28-q2": {**DIRECT, "topk": 28, "value_bits": 2},
            "flexdemo-k24-q2": {**DIRECT, "topk": 24, "value_bits": 2},
            # the embedding, lm_head and 1-D tensors at a multiple of the learning rate (an optim setting)
            "flexdemo-edge0.3": {**DIRECT, "edge_lr_scale": 0.3}, "flexdemo-edge3": {**DIRECT, "edge_lr_scale": 3.0},
            # the schedule: cosine to 0 instead of to 0.1 x lr (a sign step moves every element by lr, noise or not)
            "flexdemo-min0": {**DIRECT, "min_lr_ratio": 0.0},
            # decoupled weight decay (p *= 1 - lr * wd; DeMo's default is none; AdamW's here is 0.1), and AdamW without
            "flexdemo-wd0.1": {**DIRECT, "weight_decay": 0.1}, "flexdemo-wd1": {**DIRECT, "weight_decay": 1.0},
            "flexdemo-wd0.3": {**DIRECT, "weight_decay": 0.3}, "flexdemo-wd3": {**DIRECT, "weight_decay": 3.0},
            "adamw-wd0": {"weight_decay": 0.0},
            "flexdemo-raw": {**DIRECT, "sign": False},  # the decoded momentum itself, unsigned (SGD-like on its top-k)
            # the exchange overlapped with the next step's compute: each update applied one step late, or each
            # layer's just before its next forward (the numbers of no overlap)
            "flexdemo-overlap": {**DIRECT, "overlap": "stale"},
            "flexdemo-layerwise": {**DIRECT, "overlap": "layerwise"},
            # Nesterov-style look-ahead: the top-k of delta + nu * lr * grad sent, delta minus that kept
            "flexdemo-nest0.5": {**DIRECT, "nesterov": 0.5}, "flexdemo-nest1": {**DIRECT, "nesterov": 1.0},
            # each tensor's step x the replicas' mean RMS of the Adam update of their own gradients
            "flexdemo-scaled": {**DIRECT, "tensor_scale": "adam_rms"},
            # each replica's own Adam update compressed with error feedback (uncompressed and unsigned: AdamW), applied
            # unsigned or signed; weight decay as AdamW's here
            "flexdemo-adamw": PRE_ADAM,
            "flexdemo-adamw-sign": {**DIRECT, "precondition": "adam", "weight_decay": 0.1},
            "flexdemo-adamw-k64": {**PRE_ADAM, "topk": 64},
            "flexdemo-adamw-k512": {**PRE_ADAM, "topk": 512},
            # no error feedback: what is not sent is dropped (beta 0), so nothing is applied late
            "flexdemo-adamw-b0": {**PRE_ADAM, "beta": 0.0},
            "flexdemo-adamw-k512-b0": {**PRE_ADAM, "topk": 512, "beta": 0.0},
            # what is not sent decays faster (Adam's own m already averages the gradient)
            "flexdemo-adamw-b0.99": {**PRE_ADAM, "beta": 0.99},
            "flexdemo-adamw-b0.9": {**PRE_ADAM, "beta": 0.9},
            "flexdemo-adamw-b0.9999": {**PRE_ADAM, "beta": 0.9999},
            # sent values in fp32 instead of bf16 (what the everything-sent check also changes)
            "flexdemo-adamw-fp32": {**PRE_ADAM, "value_dtype": "fp32"},
            # a check of the machinery: everything sent in fp32, so this is Adam without bias correction
            "flexdemo-adamw-all": {**PRE_ADAM, "topk": 4096, "value_dtype": "fp32"},
            # the same share of coefficients (1/128) from smaller chunks: 8 of 32², 2 of 16²
            "flexdemo-c32": {**DIRECT, "chunk": 32, "topk": 8}, "flexdemo-c16": {**DIRECT, "chunk": 16, "topk": 2},
            "flexdemo-adamw-c32": {**PRE_ADAM, "chunk": 32, "topk": 8},
            # the momentum gathers gradients, not lr x gradients: the annealed steps follow recent gradients
            "flexdemo-nolr": {**DIRECT, "fold_lr": False},
            # the replicas' coefficients averaged over all R (sum / R), not over the replicas that sent each one
            "flexdemo-meanall": {**DIRECT, "replica_mean": "all"},
            # each matrix's decoded direction orthogonalised (Newton-Schulz, as Muon), at AdamW's update RMS
            "flexdemo-ortho": {**NO_WD, "base_step": "orthogonal"},
            "flexdemo-ortho-chunk": {**NO_WD, "base_step": "orthogonal", "orthogonal_scope": "chunk"},
            "flexdemo-ortho-bf16": {**NO_WD, "base_step": "orthogonal", "orthogonal_precision": "bf16"},
            "flexdemo-ortho-wd0.1": {"base_step": "orthogonal", "weight_decay": 0.1},
            "flexdemo-ortho-chunk-wd0.1": {"base_step": "orthogonal", "orthogonal_scope": "chunk", "weight_decay": 0.1},
            # ... with the bytes goal's wire (k 28, values in 2 bits: 152.9x less than dense bf16 for base 2 x 2)
            "flexdemo-ortho-k28-q2": {**NO_WD, "base_step": "orthogonal", "topk": 28, "value_bits": 2},
            "flexdemo-ortho-chunk-bf16": {**NO_WD, "base_step": "orthogonal", "orthogonal_scope": "chunk",
                                          "orthogonal_precision": "bf16"},
            # each chunk's mean coefficients replaced by their signs (the per-chunk orthogonal step's limit; with
            # weight decay 0.1 the default since 2026-12-04, named as the runs before then name it)
            "flexdemo-coefsign": {**NO_WD, "base_step": "coefficient_sign"},
            "flexdemo-coefsign-k28-q2": {**NO_WD, "base_step": "coefficient_sign", "topk": 28, "value_bits": 2},
            "flexdemo-coefsign-wd0.1": {"base_step": "coefficient_sign", "weight_decay": 0.1},  # the default's values
            # ... with the bytes goal's wire (k 28, values in 2 bits: 152.9x less than dense bf16 for base 2 x 2)
            "flexdemo-coefsign-wd0.1-k28-q2": {"base_step": "coefficient_sign", "weight_decay": 0.1, "topk": 28,
                                               "value_bits": 2},
            # ... values in 2 bits at k 32, and in 4 bits at k 30 (with Elias-Fano indices, index_coding=elias_fano:
            # 168.7x and 152.9x)
            "flexdemo-coefsign-wd0.1-q2": {"base_step": "coefficient_sign", "weight_decay": 0.1, "value_bits": 2},
            "flexdemo-coefsign-wd0.1-k30-q4": {"base_step": "coefficient_sign", "weight_decay": 0.1, "topk": 30,
                                               "value_bits": 4},
            # ... each value's sign at its chunk's scale, the momentum losing the whole value (value_bits=1), with
            # Elias-Fano indices: 183.8x
            "flexdemo-coefsign-wd0.1-q1-ef": {"base_step": "coefficient_sign", "weight_decay": 0.1, "value_bits": 1,
                                              "index_coding": "elias_fano"}}
# the wire every run before 2026-12-05 sent (bf16 values, 12-bit indices): the variants named then keep it, and the
# default's (2-bit values, Elias-Fano indices) is "flexdemo" only
VARIANTS = {name: v if v is None or name == "flexdemo" else {**DEMO_WIRE, **v} for name, v in VARIANTS.items()}
# the default (its wire too) with one setting changed
VARIANTS.update({
    # the forward DCT in one tf32 (bf16) pass instead of three bf16 ones (the encode's cost, benchmarks/README.md)
    "flexdemo-tf32": {"dct_forward": "tf32"}, "flexdemo-bf16fwd": {"dct_forward": "bf16"},
    # the dense-sent tensors (norm gains) by an Adam step on their mean gradient instead of its sign
    "flexdemo-dense-adam": {"dense_step": "adam"},
    # the momentum keeps 0.2 / 0.3 of each coefficient it sent (a momentum on those sent step after step)
    "flexdemo-keep0.2": {"sent_keep": 0.2}, "flexdemo-keep0.3": {"sent_keep": 0.3},
})
# variant keys that are optim settings, not DeMoConfig's (warmup_steps replaces the size's warm-up)
OPTIM_KEYS = ("edge_lr_scale", "min_lr_ratio", "weight_decay", "grad_clip", "warmup_steps")
WEIGHT_DECAY = 0.1  # AdamW's and FlexDeMo's default (conf/optim), on matrices, unless a variant names its own


@dataclass(frozen=True)
class Size:
    model: str
    steps: int
    warmup: int
    seq_len: int
    global_batch: int
    train_chars: int  # per domain
    eval_every: int
    eval_batches: int
    lrs: dict  # optimizer -> learning rates swept
    domains: tuple = tuple(DOMAINS)  # trained and validated on, equal characters each
    save_every: int = 0  # > 0: checkpoints, so a cut run resumes where it stopped


SIZES = {
    "tiny": Size("tiny", 300, 30, 128, 16, 400_000, 50, 4,
                 {"adamw": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "flexdemo": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
                  "flexdemo-direct": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "flexdemo+adam": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]}),
    # warm-up 300 (until 2026-12-06: 100): the sign steps of FlexDeMo's default lose 4% in distribution to a warm-up
    # of 100 (four seeds), AdamW's loss is the same or better at 300, so both take it (the same schedule shape); the
    # sweeps bracket both bests at warm-up 300 (AdamW 1e-3; the default 4e-3, in distribution 8e-3)
    "small": Size("small", 1000, 300, 512, 32, 5_000_000, 100, 8,
                  {"adamw": [2.5e-4, 5e-4, 1e-3, 2e-3], "flexdemo": [2e-3, 4e-3, 8e-3, 1.6e-2],
                   "flexdemo-direct": [1e-4, 2e-4, 3e-4, 6e-4, 1e-3, 2e-3], "flexdemo+adam": [5e-4, 1e-3, 3e-3]}),
    # ten times as long on CPU (0.26 epochs, data seen at most once): does the gap close with training length?
    "tiny-long": Size("tiny", 3000, 300, 128, 16, 6_000_000, 500, 4,
                      {"adamw": [3e-3, 1e-2, 3e-2], "flexdemo": [3e-3, 1e-2, 3e-2],
                       "flexdemo-direct": [1e-3, 3e-3, 1e-2]}),
    # 4,000 steps on data seen at most once: the code domain (the standard library, ~9M tokens) would repeat, so the
    # three generated domains carry the run
    "small-long": Size("small", 4000, 200, 512, 32, 22_000_000, 500, 8,
                       {"adamw": [5e-4, 1e-3], "flexdemo": [2e-3, 4e-3], "flexdemo-direct": [3e-4, 6e-4]},
                       ("public", "math", "facts"), 500),
    # the same length with the standard library's code (real text) instead of facts (whose validation wording the
    # models fit worse the longer they train): code ends where the files do (~9M tokens on the H200's Python, ~14% of
    # the mix), the generated domains fill the rest, every token seen about once (the record's epochs say how often)
    "small-long-code": Size("small", 4000, 200, 512, 32, 29_000_000, 500, 8,
                            {"adamw": [5e-4, 1e-3], "flexdemo": [2e-3, 4e-3], "flexdemo-direct": [3e-4, 6e-4]},
                            ("public", "code", "math"), 500),
}


def split_settings(variant: dict | None) -> tuple[dict, dict]:
    """A variant's fields -> (the optim settings, weight decay defaulted; DeMoConfig's fields)."""
    variant = dict(variant or {})
    return {"weight_decay": WEIGHT_DECAY, **{k: variant.pop(k) for k in OPTIM_KEYS if k in variant}}, variant


def define_variants(specs: list[str]) -> None:
    """Variants named on the command line, NAME=JSON (``flexdemo-floor0={"min_lr_ratio": 0}``): the default's
    settings with those fields changed (DeMoConfig's or OPTIM_KEYS), validated here, before any run, so a one-off
    probe runs from this script with its definition in the summary's command instead of from an edited copy."""
    from flexdemo import DeMoConfig
    from flexmore.config import OptimConfig

    for spec in specs:
        name, sep, body = spec.partition("=")
        if not sep or not name.startswith("flexdemo-") or name in VARIANTS:
            raise SystemExit(f"--define {spec!r}: write NAME=JSON with a new NAME starting 'flexdemo-' (not one of "
                             "the variants already named)")
        try:
            fields = json.loads(body)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--define {spec!r}: {body!r} is not JSON ({e})") from None
        if not isinstance(fields, dict):
            raise SystemExit(f"--define {spec!r}: the settings must be a JSON object, got {body!r}")
        optim, demo = split_settings(fields)
        unknown = sorted(set(demo) - {f.name for f in dataclasses.fields(DeMoConfig)})
        if unknown:
            raise SystemExit(f"--define {spec!r}: unknown setting(s) {', '.join(unknown)}; allowed: DeMoConfig's "
                             f"fields and {', '.join(OPTIM_KEYS)}")
        try:
            OptimConfig(name="flexdemo", demo=DeMoConfig(**demo), **optim)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--define {spec!r}: {e}") from None
        VARIANTS[name] = fields


def sweep_family(optim: str) -> str:
    """Whose rates a variant without its own sweep takes: AdamW's, DeMo's direct step's, or the default's."""
    if not optim.startswith("flexdemo"):
        return "adamw"
    return "flexdemo-direct" if (VARIANTS[optim] or {}).get("base_step") == "direct" else "flexdemo"


def worker(args) -> None:
    """One run (under torchrun when R > 1); rank 0 writes its result."""
    import torch

    from flexdemo import DeMoConfig
    from flexmore.config import Config, LoggingConfig, OptimConfig, ParallelConfig, TrainConfig
    from flexmore.model import count_params, load_preset
    from flexmore.train.loop import train

    size = SIZES[args.size]
    R = args.replicas[0]
    if size.global_batch % R:
        raise SystemExit(f"global batch {size.global_batch} does not split over {R} replicas")
    demo = args.optim.startswith("flexdemo")
    optim_extra, variant = split_settings(VARIANTS[args.optim])
    cfg = Config(
        model=load_preset(size.model),
        data=data_config(size),
        train=TrainConfig(steps=size.steps, seq_len=size.seq_len, micro_batch=size.global_batch // R,
                          eval_every=size.eval_every, eval_batches=size.eval_batches * R,  # the same windows at any R
                          log_every=10, progress=False, seed=args.seed,
                          save_every=size.save_every, save_model=False, device="auto"),
        optim=OptimConfig(name="flexdemo" if demo else "adamw", lr=args.lr,
                          demo=DeMoConfig(**variant), **{"warmup_steps": size.warmup, **optim_extra}),
        parallel=ParallelConfig(replicate=R, shard=1),  # more replicas than GPUs: gloo (parallel.backend=auto)
        logging=LoggingConfig(mode="disabled"),
        run_dir=args.run_dir,
    )
    t0 = time.perf_counter()
    res = train(cfg)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        val = {s: sum(v.values()) / len(v) for s, v in res.val.items()}
        tokens = size.steps * size.global_batch * size.seq_len
        train_tokens = train_stream(size).num_tokens
        out = {"optim": args.optim, "lr": args.lr, "replicas": R, "seed": args.seed, "val_loss": val[max(val)],
               "best_val_loss": min(val.values()), "best_step": min(val, key=val.get), "val_curve": val,
               "val_by_domain": res.val[max(res.val)], "val_curve_by_domain": res.val,  # step -> domain -> loss
               "train_curve": res.losses, "comm": res.comm,
               "tokens": tokens, "epochs": tokens / train_tokens, "wall_s": time.perf_counter() - t0,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "params": count_params(res.model).total,
               "settings": dataclasses.asdict(cfg.optim)}
        Path(args.result).write_text(json.dumps(out, default=str))


def data_config(size: Size):
    from flexmore.config import DataConfig

    return DataConfig(domains=list(size.domains), val_domains=list(size.domains), train_chars=size.train_chars)


def train_stream(size: Size):
    """The training mix's tokens (built once, then found in the cache): runs side by side share it, and its length
    gives the epochs (a domain may hold fewer characters than asked: code ends where the files do)."""
    from flexmore.data import ByteTokenizer
    from flexmore.data.sources import build_streams

    return build_streams(data_config(size), ByteTokenizer(), 1 << 30)[0]


def run_one(size: str, optim: str, lr: float, R: int, work: Path, overrides: list[str], seed: int = 0,
            defines: list[str] = ()) -> dict:
    name = f"{optim}-lr{lr:g}-R{R}" + (f"-s{seed}" if seed else "")
    result = work / f"{name}.json"
    if result.is_file():  # resumable: a finished run is not repeated
        return json.loads(result.read_text())
    # an unfinished attempt resumes from its last checkpoint (train.resume=auto), if it saved one
    cmd = [__file__, "--worker", "--size", size, "--optim", optim, "--lr", str(lr), "--replicas", str(R),
           "--seed", str(seed),
           "--run-dir", str(work / name), "--result", str(result), "--define", *defines, "--set", *overrides]
    if R > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={R}", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = work / f"{name}.log"  # appended to by each attempt: a cut run's evaluations so far are kept
    with log.open("a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not result.is_file():
        raise SystemExit(f"{name} failed (rc {done.returncode}); the end of {log}:\n{log.read_text()[-4000:]}")
    return json.loads(result.read_text())


# Validation text that is not held-out text of the training distribution: facts' states the training facts in a
# wording training never uses, and its loss rises with training for every optimizer (it rewards fitting the training
# wordings less), so a ratio that includes it can turn on how much each run overfits one domain's phrasing.
SHIFTED = ("facts",)


def in_distribution(r: dict) -> float | None:
    """The mean final loss over a run's validation domains that are held-out text of what it trained on."""
    v = {d: x for d, x in r.get("val_by_domain", {}).items() if d not in SHIFTED}
    return sum(v.values()) / len(v) if v else None


def over_seeds(runs: list[dict]) -> list[dict]:
    """One record per (optimizer, lr): losses averaged over its seeds (overall and per domain), the per-seed losses
    kept (``seeds``); the curves and the rest are the first seed's."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["replicas"], r["optim"], r["lr"]), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: r.get("seed", 0))
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("val_loss", "best_val_loss")}
        ids = [in_distribution(r) for r in rs]
        mean["val_in_distribution"] = None if None in ids else sum(ids) / len(ids)
        if all("val_by_domain" in r for r in rs):
            mean["val_by_domain"] = {d: sum(r["val_by_domain"][d] for r in rs) / len(rs)
                                     for d in rs[0]["val_by_domain"]}
        out.append({**rs[0], **mean, "seeds": {r.get("seed", 0): r["val_loss"] for r in rs},
                    "seeds_in_distribution": {r.get("seed", 0): x for r, x in zip(rs, ids)}})
    return out


def paired_ratio(f: dict, a: dict, key: str = "seeds") -> dict | None:
    """FlexDeMo / AdamW per seed (same seed: same initial weights), its mean and 95% t-interval; None for 1 seed.
    ``key``: the per-seed losses compared (``seeds_in_distribution``: on held-out text of the training
    distribution)."""
    seeds = sorted(set(f[key]) & set(a[key]))
    if len(seeds) < 2:
        return None
    from flexmore.study.regression import mean_ci

    ratios = [f[key][s] / a[key][s] for s in seeds]
    mean, lo, hi = mean_ci(ratios)
    return {"n": len(ratios), "mean": mean, "ci95": [lo, hi], "per_seed": dict(zip(map(str, seeds), ratios))}


def summarise(runs: list[dict], R: int) -> dict:
    mine = over_seeds([r for r in runs if r["replicas"] == R])
    names = [o for o in VARIANTS if any(r["optim"] == o for r in mine)]
    best = {o: min((r for r in mine if r["optim"] == o), key=lambda r: r["val_loss"]) for o in names}
    comm = best["flexdemo"]["comm"]
    payload = comm.get("comm/payload_bytes", 0.0)
    sent = comm.get("comm/replicate_sent_bytes", 0.0) if R > 1 else payload  # R = 1: what one of 2 nodes would send
    dense = comm.get("comm/dense_bf16_allreduce_bytes", 0.0) if R > 1 else None
    def edge(o: str, lr: float) -> bool:  # the best at the end of its sweep: the sweep does not bracket it
        lrs = [r["lr"] for r in mine if r["optim"] == o]
        return len(lrs) > 1 and lr in (min(lrs), max(lrs))

    out = {o: {"lr": b["lr"], "val_loss": b["val_loss"], "best_val_loss": b["best_val_loss"],
               "best_step": b["best_step"], "epochs": b["epochs"], "lr_at_sweep_edge": edge(o, b["lr"])}
           for o, b in best.items()}
    out["ratio"] = best["flexdemo"]["val_loss"] / best["adamw"]["val_loss"]  # of the means over seeds
    out["ratio_over_seeds"] = paired_ratio(best["flexdemo"], best["adamw"])
    out["ratio_best"] = best["flexdemo"]["best_val_loss"] / best["adamw"]["best_val_loss"]
    # the final loss per validation domain (means over seeds): which domain carries the gap
    out["ratio_by_domain"] = {d: v / best["adamw"]["val_by_domain"][d]
                              for d, v in best["flexdemo"].get("val_by_domain", {}).items()}
    def sent_bytes(r: dict) -> float:
        c = r["comm"]
        return c.get("comm/replicate_sent_bytes", 0.0) if R > 1 else c.get("comm/payload_bytes", 0.0)

    out["variants"] = {o: {"lr": b["lr"], "val_loss": b["val_loss"], "best_val_loss": b["best_val_loss"],
                           "ratio": b["val_loss"] / best["adamw"]["val_loss"], "bytes_per_step": sent_bytes(b),
                           "ratio_over_seeds": paired_ratio(b, best["adamw"]),
                           # a change to the default against the default itself, seed by seed
                           "over_default": None if o == "flexdemo" else paired_ratio(b, best["flexdemo"]),
                           "base_2x2_x_dense_bf16": base_compression(b["settings"]["demo"])}
                       for o, b in best.items() if o != "adamw"}
    out["bytes_per_step"] = sent
    out["dense_bf16_bytes_per_step"] = dense
    out["settings"] = best["flexdemo"]["settings"]
    out["sweep"] = {o: {str(r["lr"]): r["val_loss"] for r in mine if r["optim"] == o} for o in names}
    out["in_distribution"] = in_distribution_summary(mine, names)
    return out


def in_distribution_summary(mine: list[dict], names: list[str]) -> dict | None:
    """The comparison on held-out text of the training distribution only (SHIFTED left out), each optimizer at its
    best rate by that measure; None when the runs recorded no per-domain losses or every domain is shifted."""
    if any(r.get("val_in_distribution") is None for r in mine):
        return None
    best = {o: min((r for r in mine if r["optim"] == o), key=lambda r: r["val_in_distribution"]) for o in names}
    base = best["adamw"]["val_in_distribution"]
    return {"domains": [d for d in mine[0]["val_by_domain"] if d not in SHIFTED],
            **{o: {"lr": b["lr"], "val_loss": b["val_in_distribution"], "ratio": b["val_in_distribution"] / base,
                   "ratio_over_seeds": None if o == "adamw" else
                   paired_ratio(b, best["adamw"], "seeds_in_distribution"),
                   "over_default": None if o in ("adamw", "flexdemo") else
                   paired_ratio(b, best["flexdemo"], "seeds_in_distribution")}
               for o, b in best.items()}}


def over_seeds_text(q: dict) -> str:
    """A ``paired_ratio`` as the tables print it."""
    return f"over {q['n']} seeds {q['mean']:.3f}, 95% CI [{q['ci95'][0]:.3f}, {q['ci95'][1]:.3f}]"


def base_compression(demo: dict) -> float:
    """The goal's yardstick for these settings: a dense bf16 all-reduce's bytes over FlexDeMo's for `base` on 2 nodes
    x 2 GPUs (bench_demo_comm's count), whatever model this run trained."""
    from bench_demo_comm import comm_row, meta_model

    from flexdemo import DeMoConfig

    wire = {k: demo[k] for k in ("topk", "chunk", "value_dtype", "index_bits", "value_bits")}
    wire["index_coding"] = demo.get("index_coding", "fixed")  # runs from before it existed: fixed
    return comm_row(meta_model("base"), DeMoConfig(**wire), 2, 2)["ratio_vs_dense_bf16"]


def dense_for_two(params: int) -> float:
    """What one rank sends in a dense bf16 ring all-reduce at R = 2 (for R = 1 runs, which exchange nothing)."""
    return 2 * (2 - 1) / 2 * params * 2


def table(by_r: dict) -> str:
    lines = ["| R | AdamW lr | AdamW val (best) | FlexDeMo lr | FlexDeMo val (best) | ratio (best) | bytes/step "
             "across nodes | dense bf16 | compression | `base` 2 × 2: × dense bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for R, s in by_r.items():
        dense = s["dense_bf16_bytes_per_step"]
        comp = f"{dense / s['bytes_per_step']:.1f}×" if dense and s["bytes_per_step"] else "—"
        star = {o: "*" if s[o]["lr_at_sweep_edge"] else "" for o in ("adamw", "flexdemo")}
        lines.append(f"| {R} | {s['adamw']['lr']:g}{star['adamw']} | {s['adamw']['val_loss']:.4f} "
                     f"({s['adamw']['best_val_loss']:.4f}) | {s['flexdemo']['lr']:g}{star['flexdemo']} | "
                     f"{s['flexdemo']['val_loss']:.4f} ({s['flexdemo']['best_val_loss']:.4f}) | "
                     f"{s['ratio']:.3f} ({s['ratio_best']:.3f}) | "
                     f"{s['bytes_per_step']:,.0f} | {'—' if not dense else f'{dense:,.0f}'} | {comp} | "
                     f"{s['variants']['flexdemo']['base_2x2_x_dense_bf16']:.1f}× |")
        for o, v in s["variants"].items():
            if o != "flexdemo":
                comp = f"{dense / v['bytes_per_step']:.1f}×" if dense and v.get("bytes_per_step") else "—"
                edge = "*" if s[o]["lr_at_sweep_edge"] else ""
                lines.append(f"| {R} | | | {o} {v['lr']:g}{edge} | {v['val_loss']:.4f} ({v['best_val_loss']:.4f}) | "
                             f"{v['ratio']:.3f} | {v.get('bytes_per_step', 0):,.0f} | | {comp} | "
                             f"{v['base_2x2_x_dense_bf16']:.1f}× |")
    note = "\n\n* the best learning rate is at the end of its sweep (the sweep does not bracket it)."
    shifted = ""
    for R, s in by_r.items():
        if s.get("in_distribution"):
            i = s["in_distribution"]
            rest = ", ".join(f"{o} {v['ratio']:.3f} (lr {v['lr']:g}"
                             + (f"; {over_seeds_text(q)}" if (q := v.get("ratio_over_seeds")) else "")
                             + (f"; × the default {over_seeds_text(q)})" if (q := v.get("over_default")) else ")")
                             for o, v in i.items() if o not in ("domains", "adamw"))
            shifted += (f"\n\nR = {R}, on held-out text of the training distribution only ({', '.join(i['domains'])}; "
                        f"each at its best rate by that measure): AdamW {i['adamw']['val_loss']:.4f} (lr "
                        f"{i['adamw']['lr']:g}); FlexDeMo / AdamW {rest}")
    seeds = [f"R = {R}: FlexDeMo / AdamW {over_seeds_text(q)}" for R, s in by_r.items()
             if (q := s.get("ratio_over_seeds"))]
    return ("\n".join(lines) + (note if any("*" in line for line in lines[2:]) else "") + shifted
            + ("\n\n" + "\n".join(seeds) if seeds else ""))


def plot(runs: list[dict], by_r: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib not installed: no curves.png)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_r), figsize=(5 * len(by_r), 4), squeeze=False)
    for ax, (R, s) in zip(axes[0], by_r.items()):
        for o, colour in (("adamw", "C0"), ("flexdemo", "C3")):
            r = next(x for x in runs if x["replicas"] == R and x["optim"] == o and x["lr"] == s[o]["lr"])
            for curve, style in (("train_curve", {"alpha": 0.35, "lw": 0.8}),
                                 ("val_curve", {"marker": "o", "label": f"{o} lr {s[o]['lr']:g} (val)"})):
                pts = sorted((int(k), v) for k, v in r[curve].items())  # read back from JSON: string keys
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, **style)
        ax.set_title(f"R = {R}: train (faint) and validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)  # first the command line's own variants: --optim may name one
    pre.add_argument("--define", nargs="*", default=[])
    defines = pre.parse_known_args()[0].define
    define_variants(defines)
    ap = argparse.ArgumentParser()
    ap.add_argument("--define", nargs="*", default=[], metavar="NAME=JSON",
                    help='variants of the default for this run, e.g. \'flexdemo-floor0={"min_lr_ratio": 0}\' '
                         "(then name them in --variants)")
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--replicas", nargs="+", type=int, default=[1])
    ap.add_argument("--out", default="outputs/parity")
    ap.add_argument("--set", nargs="*", default=[], help="override Size fields, e.g. steps=50 (a smoke run)")
    ap.add_argument("--seeds", type=int, default=1, help="initial weights per (optimizer, lr): losses are averaged, "
                    "and the FlexDeMo / AdamW ratio gets a 95%% interval over seeds")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1: more "
                    "seeds for an earlier run (this run's summary holds these seeds only)")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (one GPU has room for several at small)")
    ap.add_argument("--lrs", nargs="*", default=[], metavar="OPTIM=LR,LR", help="override a sweep, e.g. adamw=1e-3")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--optim", default="adamw", choices=list(VARIANTS))
    ap.add_argument("--variants", nargs="+", default=["adamw", "flexdemo"], choices=list(VARIANTS),
                    help="what to compare (adamw and flexdemo always)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    if args.first_seed < 0 or args.seeds < 1:
        raise SystemExit(f"--first-seed {args.first_seed} --seeds {args.seeds}: seeds start at 0 or later, at least "
                         "one")
    size = SIZES[args.size]
    for kv in args.set:
        k, v = kv.split("=")
        size = dataclasses.replace(size, **{k: type(getattr(size, k))(v)})
    lrs = dict(size.lrs)
    for kv in args.lrs:
        k, v = kv.split("=")
        lrs[k] = [float(x) for x in v.split(",")]
    size = dataclasses.replace(size, lrs=lrs)
    SIZES[args.size] = size  # the worker reads it
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_stream(size)
    plan = [(optim, lr, R, seed) for R in args.replicas
            for optim in dict.fromkeys(["adamw", "flexdemo", *args.variants])
            for lr in size.lrs.get(optim) or size.lrs[sweep_family(optim)]
            for seed in range(args.first_seed, args.first_seed + args.seeds)]

    def one(job):
        optim, lr, R, seed = job
        r = run_one(args.size, optim, lr, R, out / "runs", args.set, seed, defines)
        print(f"R={R} {optim} lr {lr:g} seed {seed}: val {r['val_loss']:.4f} (best {r['best_val_loss']:.4f} at step "
              f"{r['best_step']}), {r['epochs']:.2f} epochs, {r['wall_s']:.0f}s", flush=True)
        return {**r, "size": args.size}

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each run is its own process; threads only wait
        runs = list(pool.map(one, plan))
    by_r = {R: summarise(runs, R) for R in args.replicas}
    for R, s in by_r.items():
        if s["dense_bf16_bytes_per_step"] is None:
            s["dense_bf16_bytes_per_step"] = dense_for_two(runs[0]["params"])
            s["note"] = "R = 1 exchanges nothing: bytes are what one of 2 nodes would send, against a dense bf16 " \
                        "all-reduce at R = 2"
    first = by_r[args.replicas[0]]
    summary = {**first, "by_replicas": {str(R): s for R, s in by_r.items()}, "size": dataclasses.asdict(size),
               "device": runs[0]["device"], "date": time.strftime("%Y-%m-%d"),
               "command": "python benchmarks/bench_parity.py " + shlex.join(sys.argv[1:]),
               "wall_s": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "table.md").write_text(table(by_r) + "\n")
    plot(runs, by_r, out / "curves.png")
    print(table(by_r))
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
