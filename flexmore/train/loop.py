"""The training loop. Reads top to bottom: set-up (all checks first), then steps, evals, checkpoints.

One process or many under torchrun: the sync strategy is the optimizer (``optim.name``): ``adamw`` is HSDP,
``flexdemo`` shards inside a node and runs FlexDeMo across nodes, ``demo`` makes every rank a DeMo replica.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from flexmore.config import Config
from flexmore.data.loader import SequenceLoader, eval_batches
from flexmore.data.sources import build_streams
from flexmore.data.tokenizer import load_tokenizer
from flexmore.distributed import print0
from flexmore.eval.routing import routing_metrics
from flexmore.eval.validation import autocast_ctx, evaluate, mean_over_ranks
from flexmore.model import count_params, flops_per_token
from flexmore.parallel import build_parallel_model, get_strategy, init_parallel
from flexmore.parallel.parallelize import allreduce_replicas
from flexmore.store.checkpoint import CheckpointManager
from flexmore.train.logger import make_logger
from flexmore.train.optim import LRSchedule, build_optimizer
from flexmore.train.perf import peak_flops
from flexmore.train.recipe import Recipe


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, mean over ranks (every log_every)
    val: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> domain -> loss
    comm: dict[str, float] = field(default_factory=dict)  # the last step's comm/* metrics
    final_step: int = 0
    resumed_from: int | None = None
    checkpoint: Path | None = None
    model: torch.nn.Module | None = None  # the trained model, for callers that inspect it (tests, notebooks)
    optimizer: torch.optim.Optimizer | None = None
    artifact: Path | None = None  # what the recipe's finish wrote (an expert's artifact folder)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Norm over this replica's gradient (FSDP shards reduce inside the shard mesh only), then clip."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def train(cfg: Config, recipe: Recipe | None = None) -> TrainResult:
    """Train ``cfg``'s model, or what ``recipe`` says (an expert run is a recipe: ``experts.training.train_expert``)."""
    tc, strategy = cfg.train, get_strategy(cfg.optim.name)
    run_dir = Path(cfg.run_dir)
    if recipe is None and cfg.expert.base is not None:
        raise ValueError("expert.base is set but no recipe was given: run experts through "
                         "flexmore.experts.training.train_expert(cfg) (flexmore-train does)")

    # --- every check that can fail, before any data is generated or weight allocated ---
    ctx = init_parallel(cfg.parallel.replicate, cfg.parallel.shard, cfg.parallel.backend, tc.device,
                        every_rank_a_replica=strategy.every_rank_a_replica, replicate_backend=cfg.parallel.replicate_backend)
    device = ctx.device
    torch.manual_seed(tc.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_cfg = recipe.model_config if recipe else dataclasses.replace(
        cfg.model, vocab_size=cfg.model.resolved_vocab(tokenizer.vocab_size))
    ckpt = CheckpointManager(tc.save_dir or run_dir / "checkpoints", tc.keep_last)
    resume_path = ckpt.latest() if tc.resume == "auto" else None
    if resume_path is not None:
        CheckpointManager.check_compatible(resume_path, model_cfg, strategy, ctx.replicate)
    train_stream, val_streams = build_streams(cfg.data, tokenizer, model_cfg.vocab_size)
    loader = recipe.loader(train_stream, ctx.rank, ctx.world) if recipe and recipe.loader else None
    loader = loader or SequenceLoader(train_stream, tc.seq_len, tc.micro_batch, tc.grad_accum, dp_rank=ctx.rank,
                                      dp_world=ctx.world, seed=cfg.data.seed)
    val_sets = {name: eval_batches(s, tc.seq_len, tc.micro_batch, tc.eval_batches) for name, s in val_streams.items()}

    # --- model, optimizer, state ---
    mp = cfg.parallel.mixed_precision == "bf16" or (cfg.parallel.mixed_precision == "auto" and device.type == "cuda")
    init_state = None
    if recipe and recipe.init_state and resume_path is None:
        init_state = recipe.init_state(device, train_stream)
    trainable = recipe.trainable if recipe else None
    model = build_parallel_model(model_cfg, ctx, strategy, seed=tc.seed, mixed_precision=mp, init_state=init_state,
                                 trainable=trainable, reshard_after_forward=cfg.parallel.reshard_after_forward)
    counts = count_params(model)
    optimizer = build_optimizer(model, cfg.optim, device, ctx.replicate_group)
    schedule = LRSchedule(cfg.optim, tc.steps)
    result = TrainResult(model=model, optimizer=optimizer)
    start = 0
    if resume_path is not None:
        meta = CheckpointManager.load(resume_path, model, optimizer, ctx)
        loader.load_state_dict(meta["loader"])
        start = result.resumed_from = meta["step"]
        print0(f"resumed from {resume_path} at step {start}")
    print0(f"model {model_cfg.name}: {counts.describe()} | device {device}" + (f" | {recipe.name}" if recipe else ""))
    print0(f"parallel: {ctx.world} rank(s) = replicate {ctx.replicate} x shard {ctx.shard}, strategy {strategy.name}"
           + (", bf16 params / fp32 reduce" if mp and ctx.distributed else "")
           + (f", FlexDeMo kernels: {optimizer.kernels}" if hasattr(optimizer, "kernels") else ""))
    print0(f"data: {train_stream.num_tokens:,} train tokens, global batch {loader.global_batch} x {tc.seq_len} "
           f"= {loader.global_batch * tc.seq_len:,} tokens/step, {loader.epoch_steps:.0f} steps/epoch")
    flops_tok = flops_per_token(model, tc.seq_len)
    peak = peak_flops(device, tc.peak_tflops)
    logger = make_logger(cfg.logging, run_dir, {**dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
                                                  "params/total": counts.total, "params/trainable": counts.trainable},
                         ctx.rank)
    meta_base = {"model": model_cfg.shape_dict(), "model_name": model_cfg.name, "tokenizer": tokenizer.name,
                 "parallel": {"optimizer": strategy.name, "replicate": ctx.replicate, "shard": ctx.shard}}

    def save(step: int) -> Path:
        return ckpt.save(step, model, optimizer, {**meta_base, "loader": loader.state_dict()}, ctx)

    def comm_metrics() -> dict[str, float]:
        return strategy.comm_per_step(counts.total, ctx.replicate, ctx.shard, param_bytes=2 if mp else 4,
                             reduce_bytes=4, reshard_after_forward=cfg.parallel.reshard_after_forward,
                             demo_comm=getattr(optimizer, "last_comm", None))

    # --- steps ---
    params = [p for p in model.parameters() if p.requires_grad]
    step_model = torch.compile(model) if tc.compile else model
    fsdp = isinstance(model, FSDPModule)
    bar = None
    end = tc.stop_at or tc.steps
    if tc.progress and ctx.rank == 0 and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start, end):
        lr = schedule(step)
        LRSchedule.apply(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        aux_sum: dict[str, torch.Tensor] = {}
        for micro, (x, y, *inputs) in enumerate(loader.next_step()):  # inputs: a mixed batch's per-row model inputs
            if fsdp:  # reduce gradients once per step, after the last micro-batch
                model.set_requires_gradient_sync(micro == tc.grad_accum - 1)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_ctx(tc.autocast, device):
                out = step_model(x, y, **{k: v.to(device) for k, v in (inputs[0] if inputs else {}).items()})
            (out.loss / tc.grad_accum).backward()
            loss_sum += out.ce_loss.detach()
            for k in ("router_z_loss", "lb_loss", "route_loss", "layer_expert_prob", "layer_expert_topk"):
                if k in out.aux:
                    aux_sum[k] = aux_sum.get(k, 0.0) + out.aux[k].detach() / tc.grad_accum
            tokens_since += y.numel() * ctx.world
        if strategy.dense_sync and ctx.slow_replicate is not None:
            allreduce_replicas(params, ctx.slow_replicate)  # HSDP's inter-node part, over the slow link
        grad_norm = clip_gradients(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if bar is not None:
            bar.update(1)

        if done % tc.log_every == 0 or done == end:
            loss = mean_over_ranks(loss_sum / tc.grad_accum).item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"train loss is {loss} at step {done}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            tok_s = tokens_since / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm.item(),
                       "perf/tokens_per_s": tok_s, "perf/tflops": tok_s * flops_tok / 1e12}
            if peak:
                metrics["perf/mfu"] = tok_s * flops_tok / (peak * ctx.world)
            metrics.update({f"train/{k}": v.item() for k, v in aux_sum.items() if v.dim() == 0})
            metrics.update(routing_metrics({k: mean_over_ranks(v) for k, v in aux_sum.items() if v.dim() == 2},
                                           model_cfg))
            if ctx.distributed or not strategy.dense_sync:
                result.comm = comm_metrics()
                metrics.update(result.comm)
            result.losses[done] = loss
            logger.log(metrics, step=done)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
        if (tc.eval_every > 0 and done % tc.eval_every == 0) or done == end:
            val = evaluate(model, val_sets, device, tc.autocast)
            result.val[done] = val
            logger.log({f"val/{k}/loss": v for k, v in val.items()}, step=done)
            print0(f"step {done}: " + " ".join(f"val/{k}={v:.4f}" for k, v in val.items()))
        if (tc.save_every > 0 and done % tc.save_every == 0) or done == end:
            result.checkpoint = save(done)
    if bar is not None:
        bar.close()
    result.final_step = max(start, end)
    if recipe and recipe.finish and result.final_step == tc.steps:
        result.artifact = recipe.finish(model, ctx.rank, run_dir)
    if result.losses:
        first, last = result.losses[min(result.losses)], result.losses[max(result.losses)]
        print0(f"train loss {first:.4f} -> {last:.4f} over steps {min(result.losses)}..{max(result.losses)}")
    logger.finish()
    return result
