"""What a tracer is told: how to measure (:class:`TracerConfig`) and, when a runtime moves
tensors while they are traced, what it must ask that runtime (:class:`MovingTensors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["MovingTensors", "TracerConfig"]


@dataclass(frozen=True, kw_only=True)
class TracerConfig:
    """How the tracer measures.

    Attributes:
        synchronize: On CUDA, synchronise the device at every point so each interval's measured
            compute is its own. This removes the overlap of host and device work while tracing
            (the traced step is slower); turn it off for lower overhead and blurrier timings.
        subtract_dispatch_cost: Measure, when attaching, what routing one operation through the
            dispatch mode costs on this machine (~40 ms of calibration), and subtract it per
            operation from the measured compute, next to the tracer's own bookkeeping time which
            is always subtracted. Off: compute times include that cost (they read high).
    """

    synchronize: bool = True
    subtract_dispatch_cost: bool = True

    def __post_init__(self) -> None:
        for name in ("synchronize", "subtract_dispatch_cost"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TracerConfig.{name}={getattr(self, name)!r} must be True or False")


class MovingTensors(Protocol):
    """What a runtime that moves tensors off the device while they are traced tells the tracer.

    Note [tracing under a budget]: the offload runtime traces its profiling iterations inside the
    device budget, so some storages are empty (their bytes wait in a tier) when the tracer first
    sees them, the runtime's own copies run on the training thread, and compute waits for them.
    The trace must still describe the iteration as if nothing moved: a storage held away has the
    size it has on the device, the runtime's copies are not the model's operations, and waiting
    for a copy is not compute.
    """

    def away_bytes(self, storage: torch.UntypedStorage) -> int:
        """Device bytes of ``storage`` while it is held away (0: it is not)."""

    def busy(self) -> bool:
        """Whether an operation on this thread now is the runtime's own copy (not traced)."""

    def waited_s(self) -> float:
        """Seconds compute has waited for the runtime's copies so far (a running total)."""
