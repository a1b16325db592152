"""tierflow's training loop: built-in model and data, Hydra configs, the torchrun entry point.

Use ``tierflow train`` or ``python -m trainer.train`` from the shell; from Python::

    from trainer import load_config, train
    cfg, _ = load_config(["trainer.steps=20"])
    result = train(cfg)
"""

from trainer.compose import load_config
from trainer.config import ConfigError, TrainConfig
from trainer.model import GPT, GPTConfig, build_model
from trainer.train import TrainResult, dry_run, train

__all__ = ["ConfigError", "GPT", "GPTConfig", "TrainConfig", "TrainResult", "build_model", "dry_run",
           "load_config", "train"]
