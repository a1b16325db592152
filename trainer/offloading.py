"""Offloading inside the trainer: the plan runtime for a run, or its switched-off stand-in.

:func:`start_offload` returns an :class:`~tierflow.offload.OffloadRuntime` over the run's shared
tier engine, or :class:`NoOffload` with ``offload.policy=none``; the loop treats both alike.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional, Union

from tierflow.offload import OffloadRuntime
from tierflow.offload.core.names import TierName
from tierflow.trainer.build import RunParts
from tierflow.trainer.config import TrainConfig

__all__ = ["NoOffload", "start_offload"]


class _NoReport:
    def metrics(self) -> Dict[str, float]:
        return {}


class NoOffload:
    """The runtime of ``offload.policy=none``: steps run untouched, nothing is reported or saved."""

    trace = None
    last_report = _NoReport()

    def step(self, inputs: Any = None):
        return nullcontext()

    def resident(self):
        return nullcontext()

    def summary(self) -> Optional[Dict[str, Any]]:
        return None

    def save_plan(self, directory: Union[str, Path], *, plot: bool = True) -> Dict[str, Path]:
        return {}

    def close(self, restore: bool = True) -> None:
        pass


def start_offload(cfg: TrainConfig, parts: RunParts, *, checkpointing: bool) -> Union[OffloadRuntime, NoOffload]:
    """The plan runtime for ``cfg.offload`` over ``parts.engine`` (:class:`NoOffload` with policy ``none``).

    Every rank profiles, plans and runs its own plan; the budget is per rank. With in-memory
    snapshots on, parameters and optimizer states stay resident between steps (the snapshot copies
    them then). Under DistributedDataParallel, DDP owns parameter storage (broadcasts, bucket
    views) and gradients (its reducer's hooks copy them into buckets as they become ready), so
    only activations and optimizer states move (docs/runtime.md, "Data parallelism"). A tiered
    optimizer keeps its states in the same tiers already, so the runtime leaves them to it.
    """
    if cfg.offload.policy == "none":
        return NoOffload()
    movable = {"param", "grad", "optimizer_state", "activation"}
    if checkpointing:
        movable -= {"param", "optimizer_state"}
    if parts.wrapped is not parts.model:  # DDP
        movable -= {"param", "grad"}
    if cfg.optimizer.tiered.enabled:
        movable -= {"optimizer_state"}
    rt = OffloadRuntime(parts.model, parts.optimizer, cfg.offload, tiers=parts.engine,
                        hardware=cfg.tiers.hardware_model(), movable=frozenset(movable))
    if parts.placement is not None:  # built into a tier: the parameters stay there until a step needs them
        rt.adopt(parts.placement, str(TierName.first(parts.placement_tier)))
    return rt
