"""Idle intervals: the stretches between two uses of a tensor, in measured compute time.

An idle interval is what an offload plan works with: the tensor can leave at ``start_point`` and
must be back by ``end_point``; ``idle_s`` is the compute available to hide both transfers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from tierflow.profiling.trace import Category, LifetimeTrace

__all__ = ["IdleInterval", "IdleScore", "idle_intervals", "top_idle_tensors"]


@dataclass(frozen=True)
class IdleInterval:
    """One idle stretch of one tensor.

    Attributes:
        record: Index of the tensor in ``trace.tensors``.
        key: Its key.
        category: Its category.
        size_bytes: Its size.
        start_point: First point after its last access (it may leave here).
        end_point: Point at which it is next accessed (it must be back here). Smaller than
            ``start_point`` when the interval wraps into the next iteration.
        idle_s: Measured compute between the two accesses (seconds).
        wraps: True for the stretch from the last access of the trace around to the first one
            (a tensor that lives across iterations: parameters, optimizer states).
    """

    record: int
    key: str
    category: Category
    size_bytes: int
    start_point: int
    end_point: int
    idle_s: float
    wraps: bool


@dataclass(frozen=True)
class IdleScore:
    """How much offloading one tensor key could save: its bytes times its idle time.

    Attributes:
        key: Tensor key (all its records across iterations together).
        category: Its category.
        size_bytes: Its largest size.
        idle_s: Idle compute time per iteration (seconds).
        byte_seconds: Sum over its idle intervals of bytes x idle seconds, per iteration.
    """

    key: str
    category: Category
    size_bytes: int
    idle_s: float
    byte_seconds: float


def _accesses(trace: LifetimeTrace, i: int) -> List[int]:
    r = trace.tensors[i]
    points = list(r.uses)
    # A storage allocated by an operation was written then; one born at a point's own tick
    # (an input made between iterations) was not.
    if r.created is not None and r.created_tick != trace.points[r.created].tick:
        points.append(r.created)
    return sorted(set(points))


def idle_intervals(trace: LifetimeTrace, *, periodic: bool = True, min_points: int = 1) -> Tuple[IdleInterval, ...]:
    """Every idle interval of every tensor.

    Args:
        trace: A trace.
        periodic: Also report the interval that wraps from a long-lived tensor's last access to
            its first (training repeats the iteration; parameters and optimizer states idle
            across the boundary).
        min_points: Only intervals spanning at least this many whole point intervals (>= 1).

    Returns:
        Intervals ordered by tensor, then by start.

    Raises:
        ValueError: ``min_points`` < 1.
    """
    if not isinstance(min_points, int) or min_points < 1:
        raise ValueError(f"min_points={min_points!r} must be an integer >= 1")
    compute = np.array([p.compute_s for p in trace.points], dtype=np.float64)
    prefix = np.cumsum(compute)  # prefix[q] = compute_s of points 0..q
    last = len(trace.points) - 1
    out: List[IdleInterval] = []
    for i, r in enumerate(trace.tensors):
        acc = _accesses(trace, i)

        def add(start: int, end: int, idle_s: float, wraps: bool) -> None:
            out.append(IdleInterval(i, r.key, r.category, r.size_bytes, start, end, max(idle_s, 0.0), wraps))

        # Interval a+1 .. b-1 is idle; interval q lasts compute_s[q + 1] (Note [points and intervals]).
        for a, b in zip(acc, acc[1:]):
            if b - a - 1 >= min_points:
                add(a + 1, b, float(prefix[b] - prefix[a + 1]), False)
        if periodic and r.created is None and r.freed is None:
            if not acc:
                add(0, last, float(prefix[last] - prefix[0]), False)
            elif (last - acc[-1] - 1) + acc[0] >= min_points:
                tail = prefix[last] - prefix[acc[-1] + 1] if acc[-1] + 1 <= last else 0.0
                add(acc[-1] + 1, acc[0], float(tail + prefix[acc[0]] - prefix[0]), True)
    return tuple(out)


def top_idle_tensors(trace: LifetimeTrace, n: int = 10) -> Tuple[IdleScore, ...]:
    """The ``n`` tensor keys with the most bytes x idle time per iteration.

    Args:
        trace: A trace.
        n: How many to return (>= 1).

    Returns:
        Scores, highest first (ties broken by key).

    Raises:
        ValueError: ``n`` < 1.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    byte_s: Dict[str, float] = defaultdict(float)
    idle: Dict[str, float] = defaultdict(float)
    meta: Dict[str, Tuple[Category, int]] = {}
    for iv in idle_intervals(trace):
        byte_s[iv.key] += iv.size_bytes * iv.idle_s
        idle[iv.key] += iv.idle_s
        cat, size = meta.get(iv.key, (iv.category, 0))
        meta[iv.key] = (cat, max(size, iv.size_bytes))
    k = trace.num_iterations
    ranked = sorted(byte_s, key=lambda key: (-byte_s[key], key))[:n]
    return tuple(IdleScore(key, meta[key][0], meta[key][1], idle[key] / k, byte_s[key] / k) for key in ranked)
