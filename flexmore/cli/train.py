"""`flexmore-train`: compose the hydra config, turn it into dataclasses (validating them), run the loop."""

from __future__ import annotations

import dataclasses

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from flexmore.config import Config, DeMoConfig
from flexmore.experts.training import train_expert
from flexmore.model.presets import conf_dir
from flexmore.train.loop import train

ConfigStore.instance().store(name="config_schema", node=Config)


def to_config(dcfg: DictConfig) -> Config:
    """Structured-config object with every dataclass's __post_init__ checks run; ``???`` values must be given."""
    missing = sorted(OmegaConf.missing_keys(dcfg))
    if missing:
        raise ValueError(f"required config values are not set: {', '.join(missing)}; "
                         f"give them on the command line, e.g. {missing[0]}=...")
    try:
        return OmegaConf.to_object(dcfg)
    except ValueError as e:  # flexdemo's own checks name the field alone: say where it sits in this config
        field = str(e).split("=", 1)[0]
        if field in {f.name for f in dataclasses.fields(DeMoConfig)}:
            raise ValueError(f"optim.demo.{e}") from None
        raise


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    if cfg.expert.base is not None:  # a FlexMoRE expert against a frozen base
        train_expert(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
