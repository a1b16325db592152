"""Hand-built traces and hardware for the planner and simulator tests (no tests here).

Every trace is one iteration. ``tensor(...)`` spells a record by its points; ticks follow
Note [ticks]: point ``p`` sits at tick ``10 p``, a creation inside interval ``p`` at ``10 p + 1``
and a free at ``10 p + 2``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from tierflow.offload.core.hardware import HardwareModel, LinkModel, TierModel
from tierflow.profiling.trace import Category, LifetimeTrace, Phase, Point, PointKind, TensorRecord

__all__ = ["hardware", "make_trace", "tensor", "toy_trace"]


def tensor(key: str, size: int, uses: Sequence[int], created: Optional[int] = None, freed: Optional[int] = None,
           category: Category = Category.ACTIVATION) -> TensorRecord:
    return TensorRecord(key=key, category=category, size_bytes=size, dtype="float32", device="cpu",
                        iteration=None if created is None else 0, created=created, freed=freed, uses=tuple(uses),
                        created_tick=-1 if created is None else 10 * created + 1,
                        freed_tick=None if freed is None else 10 * freed + 2)


def make_trace(compute_s: Sequence[float], tensors: Sequence[TensorRecord],
               kinds: Sequence[Tuple[PointKind, str, int]] = ()) -> LifetimeTrace:
    """Points ``0..len(compute_s)-1``; the first is the iteration start, the last its end."""
    n = len(compute_s)
    pts = []
    for p, c in enumerate(compute_s):
        if p == 0:
            kind, name, call = PointKind.ITERATION_START, "iteration", 0
        elif p == n - 1:
            kind, name, call = PointKind.ITERATION_END, "iteration", 0
        elif p - 1 < len(kinds):
            kind, name, call = kinds[p - 1]
        else:
            kind, name, call = PointKind.FORWARD_PRE, f"layer{p}", 0
        pts.append(Point(kind=kind, name=name, call_index=call, iteration=0, phase=Phase.FORWARD, compute_s=c, tick=10 * p))
    return LifetimeTrace(points=tuple(pts), tensors=tuple(tensors), num_iterations=1, model="Toy")


def hardware(bandwidth: float = 100.0, latency: float = 0.0, concurrency: int = 1, nvme_bandwidth: Optional[float] = None,
             host_bytes: int = 1 << 40, nvme_bytes: int = 1 << 40) -> HardwareModel:
    """A device and a host linked both ways (and an NVMe drive when ``nvme_bandwidth`` is given)."""
    tiers = [TierModel("device", "device", 1 << 40), TierModel("host", "host", host_bytes)]
    links = [LinkModel("device", "host", bandwidth, latency, concurrency),
             LinkModel("host", "device", bandwidth, latency, concurrency)]
    if nvme_bandwidth is not None:
        tiers.append(TierModel("nvme:0", "nvme", nvme_bytes))
        links += [LinkModel("device", "nvme:0", nvme_bandwidth, 0.0), LinkModel("nvme:0", "device", nvme_bandwidth, 0.0)]
    return HardwareModel(name="toy", tiers=tuple(tiers), links=tuple(links))


def toy_trace() -> LifetimeTrace:
    """Six points, 1 s of compute between points 0..4 (T = 0,1,2,3,4,4).

    ``Y`` (1000 B) is used everywhere; activation ``X`` (100 B) is made in interval 0 and used
    again at point 4 (idle from point 1 to 4: 3 s); temporary ``Z`` (50 B) lives in interval 2.
    Interval peaks: 1100, 1100, 1150, 1100, 1100, 1000.
    """
    return make_trace([0, 1, 1, 1, 1, 0], [
        tensor("Y", 1000, range(6), category=Category.INPUT),
        tensor("X", 100, (0, 4), created=0, freed=4),
        tensor("Z", 50, (2,), created=2, freed=2, category=Category.TEMPORARY),
    ])
