"""What the runtime reports: one step's figures (:class:`StepReport`), and the nominal hardware
model it plans with when no preset or calibrated file is given (:func:`nominal_hardware`).

Kept apart from the runtime's control flow: these change when reports or link figures do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from tierflow.offload.core.hardware import HardwareModel, LinkModel, TierModel
from tierflow.offload.core.names import TierName
from tierflow.offload.tiers.engine import TierEngine

__all__ = ["StepReport", "nominal_hardware"]


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
