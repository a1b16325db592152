"""What the runtime reports: one step's figures (:class:`StepReport`), and the nominal hardware
model it plans with when no preset or calibrated file is given (:func:`nominal_hardware`).

Kept apart from the runtime's control flow: these change when reports or link figures do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch

from tierflow.offload.core.hardware import HardwareModel, LinkModel, TierModel
from tierflow.offload.core.names import TierName
from tierflow.offload.tiers.engine import TierEngine

__all__ = ["RESERVED_MARGIN", "StepReport", "add_to_totals", "new_totals", "nominal_hardware", "warn_reserved_above"]

# Note [reserved above the budget]: the plan keeps allocated bytes under the budget; the caching
# allocator reserves more (blocks split and cached). Reserved beyond this factor of the budget on a
# planned step is reported once, with the allocator setting that bounds fragmentation. (A margin
# not yet measured on a GPU: no GPU was lent to the sessions that wrote it.)
RESERVED_MARGIN = 1.10


@dataclass(frozen=True)
class StepReport:
    """What one step did.

    Attributes:
        step: 0-based step index of the runtime.
        mode: ``off`` (policy none), ``warmup``, ``profile``, ``planned`` or ``fallback`` (the
            iteration diverged from the trace somewhere).
        bytes_out: ``(tier, bytes)`` copied off the device.
        bytes_in: ``(tier, bytes)`` copied back.
        stall_s: Seconds compute waited for transfers.
        step_s: Wall seconds of the step.
        device_reserved_peak_bytes: On CUDA, the caching allocator's reserved high-water mark of
            the step (what the device really gave up, fragmentation included); 0 on CPU.
        device_peak_bytes: Device peak as the runtime accounts it: on CUDA the allocator's
            high-water mark; on CPU the trace's peak per interval minus the bytes held away during
            it and the planned activations its checkpointed blocks did not keep (and, after a
            divergence, the bytes the fallback sees at each point once it has evicted: see
            :mod:`tierflow.offload.runtime._fallback`).
        plan_hits: Plan offloads executed (late ones included: Note [late offload]).
        plan_missed: Planned offloads of saved tensors or gradients still not found at their
            prefetch point; they stayed, and the peak shows it.
        fallbacks: Fallback actions (on-demand fetches and LRU evictions).
        fallback_evicted: ``(category, bytes)`` the fallback evicted in this step.
        fallback_settled_peak_bytes: After a divergence, the most device bytes left once the
            fallback had acted (after every operation and point): within the budget, or the step
            raised. ``device_peak_bytes`` also counts what one operation allocated before the
            fallback could act on it.
        divergence: Why the iteration left the plan ('' when it did not).
        resident_by_interval: Per interval of the trace matched, device bytes as accounted.
        absent_by_interval: Per interval matched, the fewest bytes the runtime held away during it.
    """

    step: int
    mode: str
    bytes_out: Tuple[Tuple[str, int], ...] = ()
    bytes_in: Tuple[Tuple[str, int], ...] = ()
    stall_s: float = 0.0
    step_s: float = 0.0
    device_peak_bytes: int = 0
    device_reserved_peak_bytes: int = 0
    plan_hits: int = 0
    plan_missed: int = 0
    fallbacks: int = 0
    fallback_evicted: Tuple[Tuple[str, int], ...] = ()
    fallback_settled_peak_bytes: int = 0
    divergence: str = ""
    resident_by_interval: Tuple[int, ...] = field(default=(), repr=False)
    absent_by_interval: Tuple[int, ...] = field(default=(), repr=False)

    @property
    def bytes_moved(self) -> int:
        return sum(b for _, b in self.bytes_out) + sum(b for _, b in self.bytes_in)

    def metrics(self) -> Dict[str, float]:
        """Flat numbers for wandb / metrics.jsonl (``offload/...`` keys)."""
        out: Dict[str, float] = {"offload/stall_s": self.stall_s, "offload/device_peak_bytes": self.device_peak_bytes,
                                 "offload/plan_hits": self.plan_hits, "offload/fallbacks": self.fallbacks,
                                 "offload/diverged": float(bool(self.divergence))}
        if self.device_reserved_peak_bytes:
            out["offload/device_reserved_peak_bytes"] = self.device_reserved_peak_bytes
        for tier, b in self.bytes_out:
            out[f"offload/bytes_out/{tier}"] = b
        for tier, b in self.bytes_in:
            out[f"offload/bytes_in/{tier}"] = b
        return out


def new_totals() -> Dict[str, Any]:
    """The run's totals before its first step (``OffloadRuntime.summary()`` reads them)."""
    return {"steps": {}, "bytes_out": {}, "bytes_in": {}, "stall_s": 0.0, "plan_hits": 0, "fallbacks": 0,
            "divergent_iterations": 0, "reprofiles": 0, "replans": 0, "device_peak_bytes": 0,
            "device_reserved_peak_bytes": 0, "peak_by_mode": {}}


def add_to_totals(t: Dict[str, Any], report: StepReport) -> None:
    """Count one step's report into the run's totals."""
    t["steps"][report.mode] = t["steps"].get(report.mode, 0) + 1
    for name, pairs in (("bytes_out", report.bytes_out), ("bytes_in", report.bytes_in)):
        for tier, b in pairs:
            t[name][tier] = t[name].get(tier, 0) + b
    t["stall_s"] += report.stall_s
    t["plan_hits"] += report.plan_hits
    t["fallbacks"] += report.fallbacks
    t["device_peak_bytes"] = max(t["device_peak_bytes"], report.device_peak_bytes)
    t["device_reserved_peak_bytes"] = max(t["device_reserved_peak_bytes"], report.device_reserved_peak_bytes)
    t["peak_by_mode"][report.mode] = max(t["peak_by_mode"].get(report.mode, 0), report.device_peak_bytes)


def warn_reserved_above(step: int, allocated: int, reserved: int, budget: int) -> bool:
    """Warn (and return True) when a planned step's reserved bytes passed the budget by more than
    :data:`RESERVED_MARGIN` (Note [reserved above the budget])."""
    if reserved <= budget * RESERVED_MARGIN:
        return False
    warnings.warn(f"tierflow offload: step {step} kept {allocated} bytes allocated within the budget of {budget} "
                  f"bytes, but the CUDA caching allocator reserved {reserved} bytes (more than "
                  f"{RESERVED_MARGIN - 1:.0%} above it: fragmentation); set "
                  "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or lower the budget by that much", stacklevel=4)
    return True


def nominal_hardware(engine: TierEngine, device: torch.device) -> HardwareModel:
    """A HardwareModel of ``engine``'s open tiers with nominal (not measured) link figures.

    Used when no preset or calibrated file is given; ``tierflow calibrate`` measures the real ones.
    """
    cuda = device.type == "cuda"
    figures = {"host": (2.0e10 if cuda else 8.0e9, 2e-5), "numa": (1.5e10 if cuda else 6.0e9, 2e-5),
               "nvme": (3.0e9, 1e-4)}
    tiers = [TierModel(name="device", kind="device", capacity_bytes=0, detail=str(device))]
    links = []
    for kind, tier in engine.tiers.items():
        name = str(TierName.first(kind))
        tiers.append(TierModel(name=name, kind=kind, capacity_bytes=int(tier.capacity_bytes)))
        bw, lat = figures[kind]
        for src, dst in (("device", name), (name, "device")):
            links.append(LinkModel(src=src, dst=dst, bandwidth_bytes_per_s=bw, latency_s=lat,
                                   source="nominal, not measured: run `tierflow calibrate`"))
    return HardwareModel(name=f"nominal-{device.type}", tiers=tuple(tiers), links=tuple(links),
                         source="nominal figures for the open tiers (not measured)")
