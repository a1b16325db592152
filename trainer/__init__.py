"""tierflow's training loop: built-in model and data, Hydra configs, the torchrun entry point.

Use ``tierflow train`` or ``python -m tierflow.trainer.train`` from the shell; from Python::

    from tierflow.trainer import load_config, train
    cfg, _ = load_config(["trainer.steps=20"])
    result = train(cfg)
"""

from tierflow.trainer.compose import load_config
from tierflow.trainer.config import ConfigError, TrainConfig
from tierflow.trainer.model import GPT, GPTConfig, build_model
from tierflow.trainer.train import TrainResult, dry_run, train

__all__ = ["ConfigError", "GPT", "GPTConfig", "TrainConfig", "TrainResult", "build_model", "dry_run",
           "load_config", "train"]
