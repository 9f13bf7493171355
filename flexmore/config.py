"""The run's configuration as plain dataclasses: hydra composes them in the entry points, library code only reads them.

Each dataclass validates itself in ``__post_init__``, which runs when the entry point turns the composed config
into objects, so bad values fail at start-up, before any data is built or any weight allocated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from flexdemo import DeMoConfig
from flexdemo.link import LinkCap
from flexmore.data.config import DataConfig
from flexmore.model.config import ModelConfig
from flexmore.model.experts import Ranks
from flexmore.parallel.strategy import STRATEGIES

__all__ = ["AdamWConfig", "Config", "DataConfig", "DeMoConfig", "ExpertConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
           "TrainConfig"]


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class AdamWConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"optim.adamw.betas={self.betas}: two values in [0, 1)")
        _need(self.eps > 0, f"optim.adamw.eps={self.eps} must be > 0")


@dataclass
class OptimConfig:
    """The optimizer, which is also the sync strategy (``name``): adamw (HSDP baseline), demo (every rank a DeMo
    replica), flexdemo (FSDP inside a node, DeMo across nodes). The schedule, clipping and weight decay are common;
    ``adamw`` and ``demo`` hold each optimizer's own settings (``demo`` is ``flexdemo.DeMoConfig``, described there;
    its weight decay is this one's)."""

    name: str = "adamw"  # adamw | demo | flexdemo
    lr: float = 3e-3
    weight_decay: float = 0.1
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # <= 0: off
    edge_lr_scale: float = 1.0  # the embedding, lm_head and 1-D tensors at this multiple of lr (1: one group)
    adamw: AdamWConfig = field(default_factory=AdamWConfig)
    demo: DeMoConfig = field(default_factory=DeMoConfig)

    def __post_init__(self) -> None:
        _need(self.name in STRATEGIES, f"optim.name={self.name!r}; allowed: {', '.join(STRATEGIES)}")
        _need(self.lr > 0 and math.isfinite(self.lr), f"optim.lr={self.lr} must be a finite number > 0")
        _need(math.isfinite(self.grad_clip), f"optim.grad_clip={self.grad_clip} must be a finite number (<= 0: off)")
        _need(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _need(self.schedule in ("cosine", "constant"), f"optim.schedule={self.schedule!r}; allowed: 'cosine', 'constant'")
        _need(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _need(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _need(self.edge_lr_scale > 0 and math.isfinite(self.edge_lr_scale),
              f"optim.edge_lr_scale={self.edge_lr_scale} must be a finite number > 0")
        _need(not (self.demo.overlap != "off" and STRATEGIES[self.name].dense_sync),
              f"optim.demo.overlap={self.demo.overlap} overlaps FlexDeMo's exchange, but optim.name={self.name!r} has "
              "none; use optim=flexdemo or demo, or optim.demo.overlap=off")

    def demo_config(self) -> DeMoConfig:
        return dataclasses.replace(self.demo, weight_decay=self.weight_decay)


@dataclass
class TrainConfig:
    steps: int = 150  # the schedule's length
    stop_at: Optional[int] = None  # leave early at this step (a job's time limit) with a checkpoint; resume later
    seq_len: int = 128
    micro_batch: int = 8
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    autocast: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | off
    compile: bool = False  # torch.compile the model for training (faster steps on a GPU: benchmarks/HISTORY.md)
    log_every: int = 10
    eval_every: int = 50  # <= 0: only at the end
    eval_batches: int = 4
    save_every: int = 0  # <= 0: only at the end
    keep_last: int = 2
    save_dir: Optional[str] = None  # default: <run dir>/checkpoints
    resume: str = "auto"  # auto: continue from save_dir's latest intact checkpoint if any | never (refused there)
    save_model: bool = True  # a finished run writes its model folder (safetensors) at <run dir>/model
    force_resume: bool = False  # resume although seed, seq_len or global batch changed: the data order restarts
    # a step whose loss or gradient norm is not finite on any rank: stop (naming the last good checkpoint) or skip
    # it (no update), at most max_skips in a row
    nonfinite: str = "stop"
    max_skips: int = 10
    peak_tflops: Optional[float] = None  # for MFU; default: known GPUs' dense bf16 peak
    progress: bool = True

    def __post_init__(self) -> None:
        for k in ("steps", "seq_len", "micro_batch", "grad_accum", "keep_last", "eval_batches", "log_every"):
            _need(getattr(self, k) >= 1, f"train.{k}={getattr(self, k)} must be >= 1")
        _need(self.stop_at is None or 1 <= self.stop_at <= self.steps,
              f"train.stop_at={self.stop_at} must be in [1, train.steps={self.steps}] or null")
        _need(self.device in ("auto", "cpu", "cuda"), f"train.device={self.device!r}; allowed: auto, cpu, cuda")
        _need(self.autocast in ("auto", "bf16", "off"), f"train.autocast={self.autocast!r}; allowed: auto, bf16, off")
        _need(self.resume in ("auto", "never"), f"train.resume={self.resume!r}; allowed: auto, never")
        _need(self.nonfinite in ("stop", "skip"), f"train.nonfinite={self.nonfinite!r}; allowed: stop, skip")
        _need(self.max_skips >= 1, f"train.max_skips={self.max_skips} must be >= 1")


@dataclass
class LoggingConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "flexmore"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _need(self.mode in ("offline", "online", "disabled"), f"logging.mode={self.mode!r}; allowed: offline, online, disabled")


@dataclass
class ParallelConfig:
    """The (replicate, shard) mesh. null = from torchrun: shard = LOCAL_WORLD_SIZE, replicate = WORLD_SIZE / shard."""

    replicate: Optional[int] = None
    shard: Optional[int] = None
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    mixed_precision: str = "auto"  # auto (bf16 params + fp32 reduce on GPU) | bf16 | off
    reshard_after_forward: bool = True
    # gloo: the inter-node traffic (HSDP's gradient all-reduce, FlexDeMo's exchange) goes over gloo/TCP through host
    # memory, emulating a slow link between nodes on one machine; auto: the main backend
    replicate_backend: str = "auto"
    # a collective that waits longer than this ends the run, naming the ranks that stopped reporting steps
    timeout_s: float = 600.0
    # a slow link you can set: the replicate group's collectives (over gloo) last as long as over a link of this many
    # Gbit/s per rank and this latency per message; null: uncapped
    link_gbps: Optional[float] = None
    link_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        _need(self.timeout_s > 0 and math.isfinite(self.timeout_s),
              f"parallel.timeout_s={self.timeout_s} must be a finite number of seconds > 0")
        _need(self.backend in ("auto", "nccl", "gloo"), f"parallel.backend={self.backend!r}; allowed: auto, nccl, gloo")
        _need(self.replicate_backend in ("auto", "gloo"),
              f"parallel.replicate_backend={self.replicate_backend!r}; allowed: auto, gloo")
        _need(self.mixed_precision in ("auto", "bf16", "off"),
              f"parallel.mixed_precision={self.mixed_precision!r}; allowed: auto, bf16, off")
        for k in ("replicate", "shard"):
            v = getattr(self, k)
            _need(v is None or v >= 1, f"parallel.{k}={v} must be >= 1 or null")
        _need(self.link_gbps is not None or self.link_latency_ms == 0,
              f"parallel.link_latency_ms={self.link_latency_ms} needs parallel.link_gbps (the link's bandwidth)")
        try:
            self.link()
        except ValueError as e:
            raise ValueError(f"parallel.{e}") from None

    def link(self) -> LinkCap | None:
        """The link cap (a new one: it counts what it carried), or None (uncapped)."""
        return None if self.link_gbps is None else LinkCap(self.link_gbps, self.link_latency_ms)

    @property
    def resolved_replicate_backend(self) -> str:
        """A capped link is emulated on the gloo path."""
        return "gloo" if self.link_gbps is not None else self.replicate_backend


PUBLIC_MODES = ("train", "router")


@dataclass
class ExpertConfig:
    """Train one FlexMoRE expert against a frozen base (set ``base``); empty ``base``: an ordinary run."""

    base: Optional[str] = None  # the public dense base: a model folder, or a run folder (its model folder)
    trust_checkpoint: bool = False  # also read base as a training checkpoint (DCP: unpickles; only your own run's)
    required: bool = False  # experiment=expert sets it, so a missing base is an error rather than an ordinary run
    name: str = "expert"
    kind: str = "full"  # full: a copy of the public FFN | lowrank: W_public + B A, only A and B train
    ranks: list[int] = field(default_factory=lambda: [64])  # lowrank: one rank, or three (gate, up, down)
    router_init_batches: int = 8  # batches of domain / public data whose mean FFN input starts the router rows
    public_paths: list[str] = field(default_factory=list)  # data=shards: public data (router row, negatives)
    # What keeps a merged mixture working (benchmarks/HISTORY.md, "Merged mixtures"); FlexOlmo's recipe as first
    # specified is bias=false public_fraction=0 route_loss=0.
    bias: bool = True  # the learned expert bias b < 0 on this expert's logit
    bias_init: float = -1.0  # b at step 0
    # Public negatives: this fraction of every micro-batch is public data (expert.public_paths, or the embedded
    # public domain). public_mode: train (the expert trains on those rows too) | router (held fixed there)
    public_fraction: float = 0.25
    public_mode: str = "train"
    route_loss: float = 1.0  # > 0: x the router's cross-entropy against each row's source (public or own domain)

    def __post_init__(self) -> None:
        _need(not self.required or self.base is not None,
              "expert.base is required for an expert run: the public base (a checkpoint, run folder or model folder), "
              "e.g. expert.base=outputs/small_public/<run>")
        _need(self.kind in ("full", "lowrank"), f"expert.kind={self.kind!r}; allowed: full, lowrank")
        try:
            Ranks.of(self.ranks)
        except ValueError as e:
            raise ValueError(f"expert.{e}") from None
        _need(self.router_init_batches >= 1, f"expert.router_init_batches={self.router_init_batches} must be >= 1")
        _need(self.bias_init < 0, f"expert.bias_init={self.bias_init} must be < 0")
        _need(0 <= self.public_fraction < 1, f"expert.public_fraction={self.public_fraction} must be in [0, 1)")
        _need(self.public_mode in PUBLIC_MODES, f"expert.public_mode={self.public_mode!r}; allowed: {', '.join(PUBLIC_MODES)}")
        _need(self.route_loss >= 0, f"expert.route_loss={self.route_loss} must be >= 0")
        _need(self.route_loss == 0 or self.public_fraction > 0,
              f"expert.route_loss={self.route_loss} needs public negatives (expert.public_fraction > 0) to tell apart")

    def public_rows(self, micro_batch: int) -> int:
        """Public sequences per micro-batch: public_fraction of it, rounded, at least 1 when the fraction is > 0."""
        if self.public_fraction == 0:
            return 0
        n = max(1, round(self.public_fraction * micro_batch))
        _need(n < micro_batch, f"expert.public_fraction={self.public_fraction} of train.micro_batch={micro_batch} "
                               f"leaves no row for the expert's own domain; lower it or raise train.micro_batch")
        return n


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    run_name: str = "default"
    run_dir: str = "outputs/default"  # the entry point sets it to hydra's run dir

    def __post_init__(self) -> None:
        _need(
            self.expert.base is not None or self.train.seq_len <= self.model.max_seq_len,  # experts: the base's model
            f"train.seq_len={self.train.seq_len} is larger than the model's max_seq_len={self.model.max_seq_len} "
            f"(model={self.model.name}); use train.seq_len<={self.model.max_seq_len} or raise model.max_seq_len",
        )
        if self.expert.base is not None:
            self.expert.public_rows(self.train.micro_batch)
            _need(self.data.source == "embedded" or self.expert.public_fraction == 0 or self.expert.public_paths,
                  f"expert.public_fraction={self.expert.public_fraction} with data=shards needs expert.public_paths: "
                  "shard folders of the public data (or expert.public_fraction=0)")
