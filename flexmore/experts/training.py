"""An expert run as a training recipe: the model comes from the base, upcycled to [public, new] with everything but the
new expert frozen, batches carry public negatives, and the run ends by writing the expert's artifact
(``<run dir>/expert``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from flexmore.config import Config
from flexmore.data.embedded import embedded_path
from flexmore.data.loader import MixedLoader, eval_batches
from flexmore.data.shards import TokenStream
from flexmore.data.tokenizer import Tokenizer, load_tokenizer
from flexmore.distributed import print0
from flexmore.experts.artifact import ExpertManifest, base_hash, expert_tensors, save_artifact
from flexmore.experts.upcycle import expert_config, is_trainable, mean_ffn_inputs, upcycle
from flexmore.model import ModelConfig
from flexmore.model.experts import break_even_rank
from flexmore.store.modeldir import check_trusted, load_model, read_config
from flexmore.train.loop import TrainResult, train
from flexmore.train.recipe import Recipe


def expert_model_config(cfg: Config, tokenizer: Tokenizer) -> tuple[ModelConfig, Path]:
    """The 2-expert shape from the base's own config; checked before any work."""
    ec = cfg.expert
    base_path = check_trusted(ec.base, ec.trust_checkpoint, flag="expert.trust_checkpoint=true")
    base_cfg = read_config(base_path)
    if cfg.train.seq_len > base_cfg.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} is larger than the base's max_seq_len={base_cfg.max_seq_len}")
    if tokenizer.vocab_size > base_cfg.vocab_size:
        raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} ids; the base {base_path} embeds {base_cfg.vocab_size}")
    cfg_e = expert_config(base_cfg, ec.name, ec.kind, ec.ranks, bias=ec.bias, bias_init=ec.bias_init,
                          route_loss=ec.route_loss)
    if ec.kind == "lowrank":
        be = break_even_rank(base_cfg.d_ffn, base_cfg.d_model)
        if max(cfg_e.expert_rank(1)) >= be:
            print0(f"note: expert.ranks={cfg_e.expert_rank(1)} reach the break-even rank {be:.0f} of this base: such "
                   "projections train and store a dense delta (no rank limit); use ranks below it for a low-rank expert")
    return cfg_e, base_path


def public_stream(cfg: Config, tokenizer: Tokenizer) -> TokenStream:
    """The public data every owner has: for the public router row and, with ``expert.public_fraction``, negatives."""
    if cfg.expert.public_paths:
        return TokenStream(cfg.expert.public_paths)
    if cfg.data.source != "embedded":
        raise ValueError("expert.public_paths is needed with data=shards: public data for the public router row")
    chars = cfg.train.seq_len * cfg.train.micro_batch * cfg.expert.router_init_batches * 2 + 10_000
    if cfg.expert.public_fraction > 0:
        chars = max(chars, cfg.data.train_chars)
    return TokenStream([embedded_path("public", "train", tokenizer, chars, cfg.data.seed, cfg.data.cache_dir)])


def expert_loader(cfg: Config, tokenizer: Tokenizer, train_stream: TokenStream, dp_rank: int,
                  dp_world: int) -> MixedLoader | None:
    """With public negatives, every micro-batch holds exactly ``expert.public_rows`` public sequences."""
    tc, ec = cfg.train, cfg.expert
    n = ec.public_rows(tc.micro_batch)
    if n == 0:
        return None
    return MixedLoader(train_stream, public_stream(cfg, tokenizer), tc.seq_len, tc.micro_batch, n, tc.grad_accum,
                       dp_rank=dp_rank, dp_world=dp_world, seed=cfg.data.seed, hold=ec.public_mode == "router",
                       targets=(1, 0) if ec.route_loss > 0 else None)


def expert_init_state(cfg: Config, model_cfg: ModelConfig, base_path: Path, tokenizer: Tokenizer,
                      train_stream: TokenStream, device: torch.device) -> dict[str, torch.Tensor]:
    tc, n = cfg.train, cfg.expert.router_init_batches
    base = load_model(base_path, device=device, trust_checkpoint=cfg.expert.trust_checkpoint)
    pub = mean_ffn_inputs(base, eval_batches(public_stream(cfg, tokenizer), tc.seq_len, tc.micro_batch, n), device)
    dom = mean_ffn_inputs(base, eval_batches(train_stream, tc.seq_len, tc.micro_batch, n), device)
    return upcycle(base.cpu(), model_cfg, pub.cpu(), dom.cpu(), seed=tc.seed)


def frozen_hash(state: dict[str, torch.Tensor]) -> str:
    """The base hash of an expert model: its frozen tensors are exactly the base's."""
    return base_hash({k: v for k, v in state.items() if not is_trainable(k) and ".router." not in k})


def expert_recipe(cfg: Config) -> Recipe:
    """Checks the base and the settings before any work; the hooks run inside the training loop."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_cfg, base_path = expert_model_config(cfg, tokenizer)

    def finish(model: torch.nn.Module, rank: int, run_dir: Path) -> Path | None:
        out = write_expert_artifact(cfg, model, model_cfg, cfg.train.steps, rank, run_dir / "expert")
        print0(f"expert artifact: {run_dir / 'expert'}")
        return out

    return Recipe(
        name=f"expert {cfg.expert.name}", model_config=model_cfg, trainable=is_trainable,
        loader=lambda stream, dp_rank, dp_world: expert_loader(cfg, tokenizer, stream, dp_rank, dp_world),
        init_state=lambda device, stream: expert_init_state(cfg, model_cfg, base_path, tokenizer, stream, device),
        finish=finish)


def train_expert(cfg: Config) -> TrainResult:
    return train(cfg, expert_recipe(cfg))


def write_expert_artifact(cfg: Config, model: torch.nn.Module, model_cfg: ModelConfig, steps: int, rank: int,
                          out: Path) -> Path | None:
    """Gather the full state (every rank takes part), then rank 0 writes the artifact atomically."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    tensors = expert_tensors(state, model_cfg.n_layers, 1)
    trainable = sum(v.numel() for k, v in state.items() if is_trainable(k))
    ec = cfg.expert
    manifest = ExpertManifest(
        name=ec.name, domain=",".join(cfg.data.domains) if cfg.data.source == "embedded" else ",".join(cfg.data.paths),
        kind=ec.kind, ranks=model_cfg.expert_rank(1) or None,
        dense_projections=model.blocks[0].ffn.experts[1].dense_projections() if ec.kind == "lowrank" else [],
        base_hash=frozen_hash(state), base=str(ec.base),
        model={k: getattr(model_cfg, k) for k in ("d_model", "d_ffn", "n_layers", "vocab_size")},
        params=trainable, steps=steps,
        training={"optim": cfg.optim.name, "lr": cfg.optim.lr, "seq_len": cfg.train.seq_len,
                  "global_batch": cfg.train.micro_batch * cfg.train.grad_accum, "bias": ec.bias,
                  "bias_init": ec.bias_init, "public_fraction": ec.public_fraction, "public_mode": ec.public_mode,
                  "route_loss": ec.route_loss},
    )
    return save_artifact(out, tensors, manifest, overwrite=True)
