"""Memory over time, derived from a trace: live bytes per category, the peak, the active fraction.

Pure functions of a :class:`~tierflow.profiling.trace.LifetimeTrace`; no device is needed. The exact
order of allocations and frees (Note [ticks] in :mod:`tierflow.profiling.trace`) makes the peak the true
high-water mark of the traced tensors, including peaks between two points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from tierflow.profiling.trace import Category, LifetimeTrace

__all__ = ["CATEGORIES", "ActiveFraction", "MemoryTimeline", "Peak", "active_fraction", "memory_timeline"]

#: Category order of every per-category tuple in this module.
CATEGORIES: Tuple[Category, ...] = tuple(Category)
_CAT_INDEX = {c: i for i, c in enumerate(CATEGORIES)}


@dataclass(frozen=True)
class Peak:
    """The highest total of live traced bytes.

    Attributes:
        total_bytes: Live bytes at the peak.
        point: The interval (point index) in which it happens.
        tick: The event after which it is reached (see Note [ticks]).
        by_category: ``(category, bytes)`` live at that moment, in :data:`CATEGORIES` order.
    """

    total_bytes: int
    point: int
    tick: int
    by_category: Tuple[Tuple[Category, int], ...]

    def bytes_of(self, category: Category) -> int:
        return dict(self.by_category)[category]


@dataclass(frozen=True)
class MemoryTimeline:
    """Live bytes per category at every point, and the peak inside every interval.

    Attributes:
        live_bytes: ``live_bytes[p][c]``: bytes of category ``CATEGORIES[c]`` live right after
            point ``p`` (at the start of interval ``p``).
        interval_peak_bytes: ``interval_peak_bytes[p]``: highest total during interval ``p``.
        peak: The highest total of the whole trace.
    """

    live_bytes: Tuple[Tuple[int, ...], ...]
    interval_peak_bytes: Tuple[int, ...]
    peak: Peak

    def bytes_at(self, point: int, category: Optional[Category] = None) -> int:
        """Live bytes right after ``point``: of one category, or in total when None."""
        row = self.live_bytes[point]
        return sum(row) if category is None else row[_CAT_INDEX[category]]


@dataclass(frozen=True)
class ActiveFraction:
    """TERAIO's active fraction: bytes touched within a window over bytes allocated in it.

    Attributes:
        window: Intervals per window.
        windows: ``(first_point, active_bytes, allocated_bytes)`` per window, in order.
        mean: Mean of ``active / allocated`` over the windows in which something ran (TERAIO's
            "on average"; TERAIO averages over kernels).
        overall: ``sum(active) / sum(allocated)`` (weights large windows more).
    """

    window: int
    windows: Tuple[Tuple[int, int, int], ...]
    mean: float
    overall: float


def _event_arrays(trace: LifetimeTrace) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Allocations and frees sorted by tick: (ticks, signed bytes, category index, is allocation)."""
    recs = trace.tensors
    size = np.fromiter((r.size_bytes for r in recs), dtype=np.int64, count=len(recs))
    cat = np.fromiter((_CAT_INDEX[r.category] for r in recs), dtype=np.int64, count=len(recs))
    born = np.fromiter((r.created_tick for r in recs), dtype=np.int64, count=len(recs))
    died = np.fromiter((-1 if r.freed_tick is None else r.freed_tick for r in recs), dtype=np.int64, count=len(recs))
    freed = died >= 0
    ticks = np.concatenate([born, died[freed]])
    delta = np.concatenate([size, -size[freed]])
    cats = np.concatenate([cat, cat[freed]])
    is_alloc = np.concatenate([np.ones(len(recs), bool), np.zeros(int(freed.sum()), bool)])
    order = np.argsort(ticks, kind="stable")
    return ticks[order], delta[order], cats[order], is_alloc[order]


def memory_timeline(trace: LifetimeTrace) -> MemoryTimeline:
    """Live bytes per category at each point and the peak of each interval and of the trace.

    Args:
        trace: A trace.

    Returns:
        The timeline; ``peak`` is exact (every allocation and free is replayed in order).

    Raises:
        ValueError: the trace has no points.
    """
    if not trace.points:
        raise ValueError("the trace has no points; trace at least one iteration")
    ticks, delta, cats, _ = _event_arrays(trace)
    k = len(CATEGORIES)
    per_cat = np.zeros((len(ticks) + 1, k), dtype=np.int64)  # row e: live after the first e events
    if len(ticks):
        onehot = np.zeros((len(ticks), k), dtype=np.int64)
        onehot[np.arange(len(ticks)), cats] = delta
        per_cat[1:] = np.cumsum(onehot, axis=0)
    total = per_cat.sum(axis=1)
    point_ticks = np.array([p.tick for p in trace.points], dtype=np.int64)
    at = np.searchsorted(ticks, point_ticks, side="right")  # events up to and including each point
    nxt = np.append(np.searchsorted(ticks, point_ticks[1:], side="left"), len(ticks))
    interval_peak = np.empty(len(point_ticks), dtype=np.int64)
    argmax = np.empty(len(point_ticks), dtype=np.int64)
    for p in range(len(point_ticks)):
        # Rows at[p] .. nxt[p]: the state at the point, then after each event inside the interval.
        lo, hi = at[p], max(nxt[p], at[p])
        j = lo + int(np.argmax(total[lo:hi + 1]))
        interval_peak[p], argmax[p] = total[j], j
    p_star = int(np.argmax(interval_peak))
    row = argmax[p_star]
    peak_tick = int(ticks[row - 1]) if row > 0 and row > at[p_star] else int(point_ticks[p_star])
    peak = Peak(total_bytes=int(interval_peak[p_star]), point=p_star, tick=peak_tick,
                by_category=tuple((c, int(per_cat[row, i])) for i, c in enumerate(CATEGORIES)))
    live = tuple(tuple(int(v) for v in per_cat[a]) for a in at)
    return MemoryTimeline(live_bytes=live, interval_peak_bytes=tuple(int(v) for v in interval_peak), peak=peak)


def active_fraction(trace: LifetimeTrace, window: int = 1) -> ActiveFraction:
    """Bytes used within each window of ``window`` intervals over bytes allocated during it.

    Windows never cross an iteration boundary, and the gaps between iterations (nothing is
    recorded there) are not windows. A tensor is *active* in a window when an operation in it
    reads or writes it or allocates it; *allocated* counts every tensor live at any moment of
    the window.

    Args:
        trace: A trace.
        window: Intervals per window (>= 1). TERAIO measures per kernel; a point interval holds
            one or more kernels, so ``window=1`` is the finest this trace can show.

    Returns:
        Per-window bytes and the mean fraction.

    Raises:
        ValueError: ``window`` < 1.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be an integer >= 1 (intervals per window)")
    points = trace.points
    window_of = np.full(len(points), -1, dtype=np.int64)
    firsts = []
    for start, end in trace.iteration_bounds():
        for a in range(start, end, window):
            window_of[a:min(a + window, end)] = len(firsts)
            firsts.append(a)
    n_win = len(firsts)
    sizes = np.fromiter((r.size_bytes for r in trace.tensors), dtype=np.int64, count=len(trace.tensors))
    # Active: distinct (tensor, window) pairs among uses and in-interval allocations.
    rec_idx, pts = [], []
    for i, r in enumerate(trace.tensors):
        for u in r.uses:
            rec_idx.append(i)
            pts.append(u)
        if r.created is not None and r.created_tick != points[r.created].tick:
            rec_idx.append(i)
            pts.append(r.created)
    rec_arr, win_arr = np.asarray(rec_idx, dtype=np.int64), window_of[np.asarray(pts, dtype=np.int64)]
    keep = win_arr >= 0
    pairs = np.unique(rec_arr[keep] * max(n_win, 1) + win_arr[keep])
    active = np.bincount(pairs % max(n_win, 1), weights=sizes[pairs // max(n_win, 1)], minlength=n_win)
    # Allocated: live at the window's first point plus everything allocated inside the window.
    ticks, delta, _, is_alloc = _event_arrays(trace)
    live = np.concatenate([[0], np.cumsum(delta)])
    alloc_cum = np.concatenate([[0], np.cumsum(np.where(is_alloc, delta, 0))])
    allocated = np.zeros(n_win, dtype=np.int64)
    bounds = trace.iteration_bounds()
    ends: Dict[int, int] = {}
    for start, end in bounds:
        for a in range(start, end, window):
            ends[a] = min(a + window, end)
    for w, a in enumerate(firsts):
        t0, t1 = points[a].tick, points[ends[a]].tick
        i0, i1 = np.searchsorted(ticks, t0, side="right"), np.searchsorted(ticks, t1, side="left")
        allocated[w] = live[i0] + (alloc_cum[i1] - alloc_cum[i0])
    rows = tuple((firsts[w], int(active[w]), int(allocated[w])) for w in range(n_win))
    # A window in which nothing ran (two points back to back, e.g. a module and its first child)
    # holds no kernel; TERAIO averages over kernels, so such windows do not count.
    ratios = [a / b for _, a, b in rows if b > 0 and a > 0]
    total_alloc = sum(b for _, _, b in rows)
    return ActiveFraction(window=window, windows=rows, mean=float(np.mean(ratios)) if ratios else 0.0,
                          overall=sum(a for _, a, _ in rows) / total_alloc if total_alloc else 0.0)
