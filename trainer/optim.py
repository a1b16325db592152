"""Optimizer and learning-rate schedule built from :class:`OptimizerConfig`.

With ``optimizer.tiered.enabled=true`` the optimizer is wrapped in a
:class:`~tierflow.offload.TieredOptimizer` whose state lives in the run's ``tiers`` (``docs/optimizer.md``);
the schedule then steers the wrapper, which shares the wrapped optimizer's hyperparameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tierflow.offload import TieredOptimizer, TierEngine, TiersConfig, with_master_weights
from tierflow.trainer.config import ConfigError, OptimizerConfig

__all__ = ["build_optimizer", "lr_factor", "tiered_summary"]


def lr_factor(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, total_steps: int, tiers: Optional[TiersConfig] = None,
                    grad_accum: int = 1, engine: Optional[TierEngine] = None,
                    master_weights: bool = False) -> Tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW or SGD with weight decay on matrices and embeddings only (not norms or biases).

    Args:
        model: the module whose trainable parameters are optimized.
        cfg: the ``optimizer`` group.
        total_steps: optimizer steps of the run (for the cosine schedule).
        tiers: the run's ``tiers`` group; needed when ``cfg.tiered.enabled``.
        grad_accum: backward passes per optimizer step (``trainer.grad_accum``): the tiered
            optimizer's ``backward_passes_per_step`` follows it unless set (then they must agree).
        engine: the run's open tiers (opened from ``tiers`` by the caller, who closes them); the
            tiered optimizer keeps its state there. Without it, the tiered optimizer opens ``tiers``.

    Raises:
        ConfigError: ``optimizer.tiered.enabled=true`` without tiers, or with a path not enabled there,
            or with ``backward_passes_per_step`` set to another value than ``grad_accum``.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    adamw, sgd = torch.optim.AdamW, torch.optim.SGD
    if master_weights:
        adamw, sgd = with_master_weights(adamw), with_master_weights(sgd)
    if cfg.name == "adamw":
        opt: torch.optim.Optimizer = adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    else:
        opt = sgd(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.tiered.enabled:
        missing = [p for p in cfg.tiered.paths if tiers is None or not getattr(tiers, p).enabled]
        if missing:
            raise ConfigError(f"optimizer.tiered.paths={list(cfg.tiered.paths)} needs tier(s) {missing} enabled in the "
                              f"run's tiers config, e.g. tiers.{missing[0]}.enabled=true"
                              + (" tiers.nvme.dirs=[/mnt/nvme0]" if "nvme" in missing else ""))
        tiered = cfg.tiered
        if tiered.backward_passes_per_step not in (1, grad_accum):
            raise ConfigError(f"optimizer.tiered.backward_passes_per_step={tiered.backward_passes_per_step} but "
                              f"trainer.grad_accum={grad_accum}: each step accumulates {grad_accum} backward passes; "
                              f"leave backward_passes_per_step unset (it follows trainer.grad_accum)")
        # Overlap must know when a gradient is final: after the last of the step's backward passes.
        tiered = dataclasses.replace(tiered, backward_passes_per_step=grad_accum)
        opt = TieredOptimizer(opt, config=tiered, tiers=engine if engine is not None else tiers)
    return opt, LambdaLR(opt, lambda step: lr_factor(cfg, step, total_steps))


def tiered_summary(optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
    """What the tiered optimizer did in a run, for its summary (None for a plain optimizer):
    sub-groups per path, I/O counters, updates begun during backward, and steps redone because
    their gradients changed after an early update (Note [overlap is checked, never trusted])."""
    if not isinstance(optimizer, TieredOptimizer):
        return None
    c = optimizer.counters
    return {"subgroups": optimizer.num_subgroups, "placement": {k: len(v) for k, v in optimizer.placement().items()},
            "overlap_backward": optimizer.overlap_backward, "early_updates": c["early_updates"],
            "redone_steps": c["redone_steps"], "reads": c["reads"], "writes": c["writes"],
            "bytes_read": c["bytes_read"], "bytes_written": c["bytes_written"]}
