"""Metrics go to wandb from rank 0 only; everywhere else (and when disabled) a no-op logger takes the calls."""

from __future__ import annotations

from pathlib import Path

from flexmore.config import LoggingConfig


class NoOpLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, config: dict):
        import wandb  # imported only when logging is on

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode,
                              dir=str(run_dir), config=config, tags=list(cfg.tags) or None)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: LoggingConfig, run_dir: str | Path, config: dict, rank: int = 0):
    if cfg.mode == "disabled" or rank != 0:
        return NoOpLogger()
    return WandbLogger(cfg, run_dir, config)
