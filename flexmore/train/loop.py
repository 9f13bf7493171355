"""The training loop. Reads top to bottom: set-up (all checks first), then steps, evals, checkpoints.

One process or many under torchrun: the sync strategy is the optimizer (``optim.name``): ``adamw`` is HSDP,
``flexdemo`` shards inside a node and runs FlexDeMo across nodes, ``demo`` makes every rank a DeMo replica.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from flexdemo import check_runnable
from flexdemo.link import LinkCap
from flexmore.config import Config
from flexmore.data.loader import SequenceLoader, eval_batches
from flexmore.data.sources import build_streams
from flexmore.data.tokenizer import load_tokenizer
from flexmore.distributed import barrier, print0
from flexmore.eval.routing import routing_metrics
from flexmore.eval.validation import autocast_ctx, evaluate, mean_over_ranks
from flexmore.model import count_params, flops_per_token
from flexmore.parallel import build_parallel_model, get_strategy, init_parallel
from flexmore.parallel.heartbeat import Heartbeat, is_timeout
from flexmore.parallel.parallelize import allreduce_replicas
from flexmore.parallel.strategy import describe_comm
from flexmore.store.checkpoint import CheckpointManager
from flexmore.store.modeldir import MODEL_DIR, save_model_dir
from flexmore.train.logger import make_logger
from flexmore.train.optim import LRSchedule, build_optimizer
from flexmore.train.perf import peak_flops
from flexmore.train.recipe import Recipe


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, mean over ranks (every log_every)
    val: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> domain -> loss
    comm: dict[str, float] = field(default_factory=dict)  # the last step's comm/* metrics
    link: LinkCap | None = None  # the capped link (parallel.link_gbps) and what it carried
    final_step: int = 0
    resumed_from: int | None = None
    skipped: list[int] = field(default_factory=list)  # steps skipped as non-finite (train.nonfinite=skip)
    model_dir: Path | None = None  # the finished run's model folder (safetensors)
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


def nonfinite_ranks(loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> list[int]:
    """The ranks whose loss or gradient norm is not finite this step, known to every rank (one small all-gather)."""
    bad = (~torch.isfinite(loss_sum.float()) | ~torch.isfinite(grad_norm.float())).reshape(1).float()
    if not dist.is_initialized():
        return [0] if bad.item() else []
    flags = [torch.zeros_like(bad) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, bad)
    flags = torch.cat(flags)
    return flags.nonzero().flatten().tolist() if flags.any() else []  # one host sync in the common case


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every rank's tensors (their local shards) is finite, agreed by all ranks."""
    device = tensors[0].device if tensors else torch.device("cpu")
    bad = torch.zeros(1, device=device)
    for t in tensors:  # accumulated on the device: one host sync at the end
        local = t.to_local() if isinstance(t, DTensor) else t
        bad += (~torch.isfinite(local.detach())).any().float()
    if dist.is_initialized():
        dist.all_reduce(bad)
    return bad.item() == 0


def write_model_dir(model, out: Path, seq_len: int) -> Path:
    """The finished model as a model folder (safetensors + JSON, with the length it was trained at), gathered from
    its shards; rank 0 writes."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        barrier()
        return out
    save_model_dir(model, out, overwrite=True, state=state, extra={"trained": {"seq_len": seq_len}})
    barrier()
    return out


def train(cfg: Config, recipe: Recipe | None = None) -> TrainResult:
    """Train ``cfg``'s model, or what ``recipe`` says (an expert run is a recipe: ``experts.training.train_expert``)."""
    tc, strategy = cfg.train, get_strategy(cfg.optim.name)
    run_dir = Path(cfg.run_dir)
    if recipe is None and cfg.expert.base is not None:
        raise ValueError("expert.base is set but no recipe was given: run experts through "
                         "flexmore.experts.training.train_expert(cfg) (flexmore-train does)")

    # --- every check that can fail, before any data is generated or weight allocated ---
    ctx = init_parallel(cfg.parallel.replicate, cfg.parallel.shard, cfg.parallel.backend, tc.device,
                        every_rank_a_replica=strategy.every_rank_a_replica, replicate_backend=cfg.parallel.resolved_replicate_backend,
                        timeout_s=cfg.parallel.timeout_s)
    device = ctx.device
    if not strategy.dense_sync:  # FlexDeMo's kernels and graphs can run on this device
        check_runnable(cfg.optim.demo_config(), device)
    torch.manual_seed(tc.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_cfg = recipe.model_config if recipe else dataclasses.replace(
        cfg.model, vocab_size=cfg.model.resolved_vocab(tokenizer.vocab_size))
    ckpt = CheckpointManager(tc.save_dir or run_dir / "checkpoints", tc.keep_last)
    if tc.resume == "never" and ckpt.steps():
        raise ValueError(f"train.resume=never, but {ckpt.dir} holds checkpoints of an earlier run (steps "
                         f"{ckpt.steps()}): a new run there would mix with them (pruning keeps the highest steps). "
                         "Move them aside, choose another train.save_dir or hydra.run.dir, or continue that run with "
                         "train.resume=auto")
    resume_path = ckpt.latest_intact(log=print0) if tc.resume == "auto" else None
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
    link = cfg.parallel.link() if ctx.replicate > 1 else None
    optimizer = build_optimizer(model, cfg.optim, device, ctx.replicate_group, link)
    schedule = LRSchedule(cfg.optim, tc.steps)
    result = TrainResult(model=model, optimizer=optimizer, link=link)
    start = 0
    if resume_path is not None:
        meta = CheckpointManager.load(resume_path, model, optimizer, ctx)
        loader.load_state_dict(meta["loader"], strict=not tc.force_resume)
        if tc.force_resume:
            print0("train.force_resume=true: weights and optimizer resumed, the data order restarts")
        start = result.resumed_from = meta["step"]
        history = meta.get("history", {})  # so a resumed run's result still covers the whole run
        result.val = {int(k): v for k, v in history.get("val", {}).items()}
        result.losses = {int(k): v for k, v in history.get("losses", {}).items()}
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
                 "seq_len": tc.seq_len,
                 "parallel": {"optimizer": strategy.name, "replicate": ctx.replicate, "shard": ctx.shard}}

    def last_good() -> str:
        latest = ckpt.latest()
        return f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"

    def save(step: int) -> Path:
        if hasattr(optimizer, "flush"):  # optim.demo.overlap: the update in flight goes into the weights first
            optimizer.flush()
        if not all_finite(list(model.parameters())):
            raise FloatingPointError(f"step {step}: the weights hold non-finite values; not saving them, {last_good()}. "
                                     "Resume from it with a lower optim.lr (or train.nonfinite=skip)")
        return ckpt.save(step, model, optimizer, {**meta_base, "loader": loader.state_dict(),
                                                   "history": {"val": result.val, "losses": result.losses}}, ctx)

    def comm_metrics(demo_comm: dict | None = None) -> dict[str, float]:
        return strategy.comm_per_step(counts.total, ctx.replicate, ctx.shard, param_bytes=2 if mp else 4,
                             reduce_bytes=4, reshard_after_forward=cfg.parallel.reshard_after_forward,
                             demo_comm=demo_comm or getattr(optimizer, "last_comm", None))

    if ctx.distributed or not strategy.dense_sync:  # what a step will send, before the first one
        print0("comm per step and rank: " + describe_comm(comm_metrics(getattr(optimizer, "comm_bytes", dict)())))

    # --- steps ---
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.compile and cfg.optim.demo.overlap == "layerwise":
        # the layers' forward hooks are not in dynamo's guards: a graph compiled earlier in this process for another
        # model of the same shape (no hooks) would be reused and skip them
        torch._dynamo.reset()
    step_model = torch.compile(model) if tc.compile else model
    fsdp = isinstance(model, FSDPModule)
    bar = None
    end = tc.stop_at or tc.steps
    if tc.progress and ctx.rank == 0 and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)
    t_last, tokens_since, skipped = time.perf_counter(), 0, 0
    heartbeat = Heartbeat()
    try:
        for step in range(start, end):
            heartbeat.beat(step)
            lr = schedule(step)
            LRSchedule.apply(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            aux_sum: dict[str, torch.Tensor] = {}
            batches = loader.next_step()
            heartbeat.beat(step, 1)
            for micro, (x, y, *inputs) in enumerate(batches):  # inputs: a mixed batch's per-row model inputs
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
            heartbeat.beat(step, 2)
            if strategy.dense_sync and ctx.slow_replicate is not None:
                allreduce_replicas(params, ctx.slow_replicate, link)  # HSDP's inter-node part, over the slow link
            grad_norm = clip_gradients(params, cfg.optim.grad_clip)
            done = step + 1
            bad = nonfinite_ranks(loss_sum, grad_norm)  # the same list on every rank, so all take the same branch
            if bad:
                what = (f"step {done}: the loss or gradient norm is not finite on rank(s) {bad} (this rank: loss "
                        f"{(loss_sum / tc.grad_accum).item():.4g}, gradient norm {grad_norm.item():.4g}); the weights "
                        "were not updated with it")
                skipped += 1
                if tc.nonfinite == "stop" or skipped > tc.max_skips:
                    optimizer.zero_grad(set_to_none=True)
                    reason = "" if tc.nonfinite == "stop" else f" ({skipped} such steps in a row, train.max_skips={tc.max_skips})"
                    raise FloatingPointError(f"{what}{reason}. Stopped; {last_good()}: resume from it (train.resume=auto) "
                                             "with a lower optim.lr, or set train.nonfinite=skip to skip such steps")
                print0(f"{what}: skipped (train.nonfinite=skip, {skipped} in a row)")
                optimizer.zero_grad(set_to_none=True)
                result.skipped.append(done)
            else:
                skipped = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update(1)

            if done % tc.log_every == 0 or done == end:
                loss = mean_over_ranks(loss_sum / tc.grad_accum).item()
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
    except BaseException as e:
        if ctx.distributed and is_timeout(e):
            raise RuntimeError(f"rank {ctx.rank}: a collective waited longer than parallel.timeout_s="
                               f"{cfg.parallel.timeout_s:g}s: {heartbeat.silent()}. A rank is stalled or dead; "
                               f"{last_good()}: restart the job to resume from it") from e
        raise
    if bar is not None:
        bar.close()
    result.final_step = max(start, end)
    if recipe and recipe.finish and result.final_step == tc.steps:
        result.artifact = recipe.finish(model, ctx.rank, run_dir)
    elif recipe is None and tc.save_model and result.final_step == tc.steps:
        result.model_dir = write_model_dir(model, run_dir / MODEL_DIR, tc.seq_len)
        print0(f"model folder (safetensors, what to hand to others): {result.model_dir}")
    if result.comm:
        print0("comm per step and rank (measured, last step): " + describe_comm(result.comm))
    if link is not None:
        print0(link.describe())
    if result.losses:
        first, last = result.losses[min(result.losses)], result.losses[max(result.losses)]
        print0(f"train loss {first:.4f} -> {last:.4f} over steps {min(result.losses)}..{max(result.losses)}")
    logger.finish()
    return result
