"""Build one training run from its config: seed, tiers, model, optimizer, schedule, data.

The builder is the one owner of shared components (torchtitan's ``Trainer.__init__``): it opens
the run's :class:`~tierflow.offload.TierEngine` once and hands it to the tiered optimizer and,
later, to the offload runtime; :meth:`RunParts.close` closes what it opened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tierflow.offload import SubgroupStepper, TierEngine
from tierflow.trainer.config import TrainConfig
from tierflow.trainer.data import ShardedLoader, TokenSource, build_source
from tierflow.trainer.distributed import Runtime
from tierflow.trainer.metrics import make_run_dir
from tierflow.trainer.model import build_model
from tierflow.trainer.optim import build_optimizer

__all__ = ["RunParts", "autocast_dtype", "build_run", "model_name", "prepare_run_dir", "seed_everything",
           "uses_tiers"]


@dataclass
class RunParts:
    """What one training run is made of, built from its config (what ``train_step`` needs).

    Attributes:
        model: The module itself; parameters, digests, profiling and offloading look here.
        wrapped: What the loop calls: ``DDP(model)`` when distributed, else ``model``.
        optimizer: The optimizer (a TieredOptimizer with ``optimizer.tiered.enabled``).
        scheduler: The learning-rate schedule.
        loader: This rank's loader.
        source: The token source.
        amp_dtype: The autocast dtype, None for fp32.
        engine: The run's open tiers (None when nothing uses tiers); shared by the tiered optimizer
            and the offload runtime, closed by :meth:`close`.
    """

    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: ShardedLoader
    source: TokenSource
    amp_dtype: Optional[torch.dtype]
    engine: Optional[TierEngine] = None
    step: Optional[SubgroupStepper] = None  # with offloading: clip and step sub-group by sub-group

    def close(self) -> None:
        """Free the optimizer's tier slots (and swap files), then close the tiers. Idempotent."""
        if hasattr(self.optimizer, "close"):
            self.optimizer.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def uses_tiers(cfg: TrainConfig) -> bool:
    """Whether the run opens tiers: offloading is on, or the optimizer keeps its state in them."""
    return cfg.offload.policy != "none" or cfg.optimizer.tiered.enabled


def build_run(cfg: TrainConfig, rt: Runtime, source: Optional[TokenSource] = None) -> RunParts:
    """Seed, then build model, tiers, optimizer, schedule and this rank's loader on ``rt.device``."""
    tc = cfg.trainer
    source = source or build_source(cfg.data, tc.seed)
    seed_everything(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Built on the meta device, then materialised tensor by tensor onto the device (bit-identical to eager).
    model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len, device=rt.device)
    wrapped: nn.Module = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.distributed else model
    engine = TierEngine(cfg.tiers) if uses_tiers(cfg) else None
    try:
        optimizer, scheduler = build_optimizer(model, cfg.optimizer, tc.steps, tiers=cfg.tiers, engine=engine,
                                               grad_accum=tc.grad_accum)
    except BaseException:
        if engine is not None:
            engine.close()
        raise
    loader = ShardedLoader(source, global_batch=tc.global_batch, grad_accum=tc.grad_accum,
                           rank=rt.rank, world_size=rt.world_size, device=rt.device)
    # With offloading, the optimizer steps one sub-group at a time: each is its own pair of trace
    # points, so the plan pages parameters, gradients and states through the step. (A tiered
    # optimizer streams its sub-groups itself.)
    step = None
    if cfg.offload.policy != "none" and not cfg.optimizer.tiered.enabled:
        # The loop zeroes gradients right after the step, so each may go as soon as it is used.
        step = SubgroupStepper(optimizer, cfg.offload.optimizer_subgroup_bytes, free_grads=True)
    return RunParts(model, wrapped, optimizer, scheduler, loader, source, autocast_dtype(tc.precision, rt.device),
                    engine, step)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 for ``precision=bf16``, and for ``auto`` on a GPU that supports it; None means fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def model_name(cfg: TrainConfig) -> str:
    """The model class's name, e.g. ``GPT`` (run directories and summaries use it)."""
    return cfg.model._target_.rsplit(".", 1)[-1]


def prepare_run_dir(cfg: TrainConfig, rt: Runtime, suffix: str = "") -> Path:
    """Rank 0 creates the run directory and saves ``config.yaml`` in it; every rank gets its path."""
    if not rt.is_main:
        return Path(rt.broadcast(None))
    run_dir = make_run_dir(cfg.logging, model_name(cfg) + suffix)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (run_dir / "config.yaml").chmod(0o600)
    return Path(rt.broadcast(str(run_dir)))
