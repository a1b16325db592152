"""Build one training run from its config: seed, tiers, model, optimizer, schedule, data.

The builder is the one owner of shared components (torchtitan's ``Trainer.__init__``): it opens
the run's :class:`~tierflow.offload.TierEngine` once and hands it to the tiered optimizer and,
later, to the offload runtime; :meth:`RunParts.close` closes what it opened.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import psutil
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tierflow.offload import SubgroupStepper, TierEngine, TierFullError
from tierflow.offload.integrations.fsdp2 import shard_blocks, shard_on_meta
from tierflow.offload.runtime.materialize import TierPlacement
from tierflow.offload.tiers import map_large_allocations
from tierflow.trainer.config import ConfigError, TrainConfig
from tierflow.trainer.data import ShardedLoader, TokenSource, build_source
from tierflow.trainer.distributed import Runtime
from tierflow.trainer.metrics import make_run_dir
from tierflow.trainer.model import build_model
from tierflow.trainer.optim import build_optimizer

__all__ = ["RunParts", "autocast_dtype", "build_in_tier", "build_run", "model_name", "prepare_run_dir",
           "seed_everything", "training_state_bytes", "uses_tiers"]


@dataclass
class RunParts:
    """What one training run is made of, built from its config (what ``train_step`` needs).

    Attributes:
        model: The module itself; parameters, digests, profiling and offloading look here.
        wrapped: What the loop calls: ``DDP(model)`` when distributed, else ``model`` (with
            ``trainer.parallel=fsdp2`` the model itself, sharded in place).
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
    placement: Optional[Any] = None  # parameters materialised into a tier (out of core): a TierPlacement or ShardPlacement
    placement_tier: str = ""  # the tier they wait in

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


# Note [the build maps its tensors]: on a CPU run the device is RAM from the first tensor built,
# not from the runtime's start. The runtime has glibc map every allocation of 1 MiB or more on its
# own so that freed memory leaves RSS (``map_large_allocations``), but the model is built before
# the runtime exists, under glibc's own rule: each large block freed raises the threshold (up to
# 32 MiB), the next tensors of that size come from the heap, and a heap only shrinks from its top.
# Building a sharded 6-layer GPT of width 2048 into NVMe left one rank's heap at 382 MiB, resident
# for the whole run (the other's at 129 MiB; which rank, and how much, follows the timing of the
# tier's writes): a 1.8B model's rank kept 2.2 GB there. Mapping from before the build keeps both
# near 170 MiB (docs/benchmarks.md). The tiered optimizer alone needs it too: without it, the
# moments it streams to NVMe left a rank's RSS where FSDP2 alone has it (958 vs 989 MiB, 588 with).


def build_run(cfg: TrainConfig, rt: Runtime, source: Optional[TokenSource] = None) -> RunParts:
    """Seed, then build model, tiers, optimizer, schedule and this rank's loader on ``rt.device``."""
    tc = cfg.trainer
    source = source or build_source(cfg.data, tc.seed)
    seed_everything(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if rt.device.type == "cpu" and uses_tiers(cfg):
        map_large_allocations()  # Note [the build maps its tensors]
    engine = TierEngine(cfg.tiers) if uses_tiers(cfg) else None
    placed: dict = {}
    sharded_build = tc.parallel == "fsdp2"

    def place_for(meta_model: nn.Module) -> Optional[Callable]:
        state_bytes = training_state_bytes(meta_model, cfg)
        if sharded_build:  # each rank builds and holds its own shards (Note [sharded build])
            state_bytes = -(-state_bytes // rt.world_size)
        check_tier_room(cfg, state_bytes, engine)
        tier = build_in_tier(cfg, rt.device, state_bytes, engine, rt.distributed and not sharded_build,
                             ranks_per_node=local_ranks(rt) if sharded_build else 1)
        tier_kind = tier.split(":")[0] if tier is not None else None
        if tier is not None:
            placed["tier"] = tier
        if sharded_build:
            try:
                placed["sharded"], place = shard_on_meta(
                    meta_model, device=rt.device, tier=engine.tiers[tier_kind] if tier_kind else None,
                    mp_policy=fsdp2_mixed_precision(tc.precision))
            except ValueError as exc:
                raise ConfigError(f"trainer.parallel=fsdp2 builds each rank's shards on the meta device: {exc}") from None
            if tier is not None:
                placed["placement"] = place
            return place
        if tier is None:
            return None
        placed["placement"] = TierPlacement(engine.tiers[tier_kind], parameters_only=True)
        return placed["placement"]

    try:
        # Built on the meta device, then materialised tensor by tensor onto the device
        # (bit-identical to eager), or, when the state does not fit, into a tier; with FSDP2,
        # each rank materialises its own shards only.
        model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len, device=rt.device,
                            place_for=place_for, dtype=model_dtype(tc.precision, tc.parallel))
    except BaseException:
        if engine is not None:
            engine.close()
        raise
    wrapped: nn.Module = model
    if sharded_build:  # sharded in place, per block: the loop calls the model itself
        model = wrapped = placed["sharded"] if "sharded" in placed else \
            shard_blocks(model, mp_policy=fsdp2_mixed_precision(tc.precision))
    elif rt.distributed:
        wrapped = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    try:
        optimizer, scheduler = build_optimizer(
            model, cfg.optimizer, tc.steps, tiers=cfg.tiers, engine=engine, grad_accum=tc.grad_accum,
            master_weights=model_dtype(tc.precision, tc.parallel) is not None)
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
                    engine, step, placed.get("placement"), placed.get("tier", ""))


def training_state_bytes(model: nn.Module, cfg: TrainConfig) -> int:
    """Parameters, gradients and optimizer states of ``model`` (meta or real) in bytes."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + grads + grads * (2 if cfg.optimizer.name == "adamw" else 1)


def check_tier_room(cfg: TrainConfig, state_bytes: int, engine: Optional[TierEngine]) -> None:
    """With a budget in bytes, what does not fit it must fit the open tiers: found when the
    tiers open, before the model is built, not at the step that runs out of room.

    Raises:
        TierFullError: the training state exceeds the budget plus every open tier's capacity.
    """
    budget = cfg.offload.device_budget_bytes
    if cfg.offload.policy == "none" or budget is None or engine is None or state_bytes <= budget:
        return
    room = {name: tier.capacity_bytes for name, tier in engine.tiers.items()}
    if state_bytes - budget <= sum(room.values()):
        return
    gib = 2 ** 30
    raise TierFullError(
        f"the training state ({state_bytes / gib:,.2f} GiB of parameters, gradients and optimizer states) does not "
        f"fit offload.device_budget_bytes ({budget / gib:,.2f} GiB) plus the open tiers ("
        + ", ".join(f"{n} {b / gib:,.2f} GiB" for n, b in room.items())
        + f"): {(state_bytes - budget - sum(room.values())) / gib:,.2f} GiB have nowhere to go. Free disk space in "
        "tiers.nvme.dirs or add a directory, raise a tier's budget_bytes, or raise the device budget")


def build_in_tier(cfg: TrainConfig, device: torch.device, state_bytes: int, engine: Optional[TierEngine],
                  distributed: bool = False, ranks_per_node: int = 1) -> Optional[str]:
    """The tier to materialise the parameters into, or None to build on the device
    (``offload.build_in_tier``: ``auto`` when the state would not fit the byte budget or, on a CPU
    machine, the memory available now). ``state_bytes`` is this rank's (its shards with FSDP2);
    ``ranks_per_node`` ranks of this node each hold as much.

    Raises:
        ConfigError: the state must go to a tier but cannot (no tier below the device is open,
            several ranks, the tiered optimizer).
    """
    o = cfg.offload
    if o.policy == "none" or o.build_in_tier == "never":
        return None
    budget = o.device_budget_bytes
    too_big = (budget is not None and state_bytes > budget) or \
        (device.type == "cpu" and state_bytes * ranks_per_node > psutil.virtual_memory().available)
    if o.build_in_tier == "auto" and not too_big:
        return None
    gib = state_bytes / 2 ** 30
    why = (f"the training state ({gib:,.2f} GiB of parameters, gradients and optimizer states) does not fit "
           + ("the device budget" if budget is not None and state_bytes > budget else "in memory")
           if o.build_in_tier == "auto" else "offload.build_in_tier=always")
    if distributed:
        raise ConfigError(f"{why}, and with trainer.parallel=ddp every rank would build the whole model into a tier; "
                          "use trainer.parallel=fsdp2 (each rank builds its shards), train on one rank, or raise the "
                          "budget so each rank holds it")
    if cfg.optimizer.tiered.enabled:
        raise ConfigError(f"{why}; with optimizer.tiered.enabled=true the parameters stay on the device: set "
                          "optimizer.tiered.enabled=false and let offloading page the whole state")
    order = ("nvme", "numa") if device.type == "cpu" else ("host", "numa", "nvme")
    opened = engine.tiers if engine is not None else {}
    for kind in order:
        if kind in opened:
            return kind
    raise ConfigError(f"{why}, and no tier below the {'memory' if device.type == 'cpu' else 'device'} is open to "
                      f"hold it; enable one, e.g. tiers.nvme.enabled=true tiers.nvme.dirs=[/path/on/ssd]")


def local_ranks(rt: Runtime) -> int:
    """Ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``; every rank when it is not set)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


def model_dtype(precision: str, parallel: str = "ddp") -> Optional[torch.dtype]:
    """bf16 parameters for ``precision=bf16_master`` (fp32 masters in the optimizer state,
    :func:`~tierflow.offload.optim.master.with_master_weights`); None keeps the model's own.

    Under ``trainer.parallel=fsdp2`` the parameters stay fp32: FSDP2's shards are the masters
    and its mixed-precision policy gathers them in bf16 (:func:`fsdp2_mixed_precision`).
    """
    return torch.bfloat16 if precision == "bf16_master" and parallel != "fsdp2" else None


def fsdp2_mixed_precision(precision: str) -> Optional[Any]:
    """FSDP2's ``MixedPrecisionPolicy`` for ``precision=bf16_master``: fp32 shards (the masters, and
    what the optimizer steps), bf16 gathers and compute, gradients reduced in fp32 (torchtitan's
    default; Note [mixed precision on shards]). None, FSDP2's default, for every other precision."""
    if precision != "bf16_master":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


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
