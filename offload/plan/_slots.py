"""Free link seconds per interval, shared by the policies that place transfers in bandwidth slots.

See Note [bandwidth slots] in :mod:`tierflow.offload.plan.policy_lifetime`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from tierflow.offload.plan.context import PlanContext

__all__ = ["EPS", "LinkSlots", "slices"]

#: Seconds below which a transfer needs no slot.
EPS = 1e-12


class LinkSlots:
    """Free link seconds per interval for every link (Note [bandwidth slots])."""

    def __init__(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        self.free: Dict[str, np.ndarray] = {}
        # Capacity only ever shrinks, so a walk that failed fails again for the same window and
        # at least the same need: many tensors share a window (all saved by one block).
        self.failed: Dict[Tuple[str, int, int, bool], float] = {}

    def _cap(self, src: str, dst: str) -> np.ndarray:
        return self.free.setdefault(f"{src}->{dst}", self.ctx.duration_s.copy())

    def walk(self, src: str, dst: str, s: int, length: int, need_s: float, forward: bool):
        """Slots a transfer of ``need_s`` would take in positions ``0..length-1`` after point ``s``.

        Returns ``(position, takes, left_s)``: forward, the position just after the last slot
        used; backward, the first slot used. ``takes`` is ``(intervals, seconds)`` arrays.
        Position is ``length`` (forward) or ``0`` (backward) with ``left_s > 0`` when capacity ran out.
        """
        cap, n = self._cap(src, dst), self.ctx.num_points
        if need_s <= EPS:
            return (0 if forward else length), (np.zeros(0, np.int64), np.zeros(0)), 0.0
        memo = (src + dst, s, length, forward)
        if need_s >= self.failed.get(memo, np.inf):
            return (length if forward else 0), (np.zeros(0, np.int64), np.zeros(0)), need_s
        first = (s if forward else s + length - 1) % n
        if cap[first] >= need_s:  # the common case: the first slot holds the whole transfer
            return (1 if forward else length - 1), (np.array([first]), np.array([need_s])), 0.0
        # Otherwise look at a short stretch first and widen it if that is not enough.
        span = min(length, 32)
        while True:
            offsets = np.arange(span) if forward else np.arange(length - 1, length - 1 - span, -1)
            pos = (s + offsets) % n
            window = cap[pos]
            filled = np.cumsum(window)
            k = int(np.searchsorted(filled, need_s - EPS, side="left"))
            if k < span:
                break
            if span == length:
                self.failed[memo] = min(need_s, self.failed.get(memo, np.inf))
                return (length if forward else 0), (pos[:0], window[:0]), float(need_s - filled[-1])
            span = min(length, span * 8)
        amounts = window[:k + 1].copy()
        amounts[k] = need_s - (filled[k - 1] if k else 0.0)
        return (k + 1 if forward else length - k - 1), (pos[:k + 1], amounts), 0.0

    def take(self, src: str, dst: str, takes) -> None:
        where, amounts = takes
        np.subtract.at(self._cap(src, dst), where, amounts)


def slices(a: int, length: int, n: int) -> List[Tuple[int, int]]:
    """Positions ``a..a+length-1`` (mod n) as array slices."""
    if length <= 0:
        return []
    end = a + length
    return [(a, end)] if end <= n else [(a, n), (0, end - n)]
