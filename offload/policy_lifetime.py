"""The ``lifetime`` policy: TERAIO/G10's rule, under a device budget.

1. If the unplanned peak fits the budget, nothing moves (hot tensors stay).
2. Every idle interval is a candidate, ranked by benefit: bytes x idle seconds freed.
3. Hidden pass: in benefit order, while some interval is over budget, take a candidate whose idle
   window covers an over-budget interval; try the tiers cheapest first (NVMe, then NUMA, then
   host) and keep the first whose round trip the link schedule can hide and whose own budget
   has room (a full tier spills to the next one). The offload takes the earliest free link
   capacity after the last use, the prefetch the *latest* free capacity before the next use
   (Note [bandwidth slots]).
4. Exposed pass, only if still over budget: the remaining candidates in order of predicted
   cost per byte, each either swapped over the fastest tier (compute waits for the part the
   link cannot hide) or, for an activation, recomputed when re-running its block is cheaper
   than that wait (Capuchin/POET).

Note [bandwidth slots]: as in G10, each link can move ``duration_s[p]`` seconds of transfer
during interval ``p``. A transfer consumes those slots (its latency included) forward from the
evict point or backward from the deadline; the device is free of the tensor between the last slot
of its offload and the first slot of its prefetch. Link capacity is shared by all decisions, so a
busy link pushes a prefetch earlier (and keeps the tensor on the device longer) or to another tier.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from offload.plan import Action, Decision, OffloadPlan, PlanningError
from offload.planner import PlanContext, feasible_minimum_bytes, finish_plan

__all__ = ["plan_lifetime", "recompute_blocks"]

_EPS = 1e-12


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms"


def recompute_blocks(trace) -> Dict[Tuple[str, int], float]:
    """``(module path, call index) -> forward compute seconds`` of every module call in the trace."""
    from profiling.trace import PointKind

    t = np.cumsum([p.compute_s for p in trace.points])
    open_: Dict[Tuple[str, int, int], int] = {}
    out: Dict[Tuple[str, int], float] = {}
    for i, p in enumerate(trace.points):
        if p.kind is PointKind.FORWARD_PRE:
            open_[(p.name, p.call_index, p.iteration)] = i
        elif p.kind is PointKind.FORWARD_POST and (p.name, p.call_index, p.iteration) in open_:
            out[(p.name, p.call_index)] = float(t[i] - t[open_.pop((p.name, p.call_index, p.iteration))])
    return out


def block_of(key: str) -> Optional[Tuple[str, int]]:
    """``module[call]:saved<i>`` -> ``(module, call)``; None for other keys."""
    head, sep, _ = key.rpartition(":saved")
    if not sep or not head.endswith("]") or "[" not in head:
        return None
    name, _, call = head[:-1].rpartition("[")
    return (name, int(call)) if call.isdigit() else None


class _Slots:
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
        if need_s <= _EPS:
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
            k = int(np.searchsorted(filled, need_s - _EPS, side="left"))
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


def _slices(a: int, length: int, n: int) -> List[Tuple[int, int]]:
    """Positions ``a..a+length-1`` (mod n) as array slices."""
    if length <= 0:
        return []
    end = a + length
    return [(a, end)] if end <= n else [(a, n), (0, end - n)]


def plan_lifetime(ctx: PlanContext) -> OffloadPlan:
    """The default policy (see the module docstring). Raises PlanningError below the feasible minimum.

    When the cheapest-tier-first plan leaves compute waiting (the budget forced exposed swaps),
    the same passes run again with the fastest tier first and the plan predicted faster is kept:
    under pressure, bandwidth matters more than where the bytes are cheapest.
    """
    plan = _plan_lifetime(ctx)
    if plan.predicted_step_s <= plan.unconstrained_step_s or len(ctx.tiers) < 2:
        return plan
    fastest = sorted(ctx.tiers, key=lambda t: (sum(ctx.round_trip(t, 1 << 20)), t))
    other = _plan_lifetime(replace(ctx, tiers=fastest))
    if other.predicted_step_s < plan.predicted_step_s:
        return replace(other, notes=other.notes + ("fastest tier first: predicted faster than cheapest first "
                                                   "under this budget",))
    return plan


def _plan_lifetime(ctx: PlanContext) -> OffloadPlan:
    n, budget = ctx.num_points, ctx.device_budget
    dev = ctx.interval_peak.copy()
    if dev.max() <= budget:
        return finish_plan(ctx, "lifetime", (), [f"the unplanned peak {int(dev.max())} bytes fits the device budget "
                                                   f"{budget} bytes: nothing moves"])
    minimum, where = feasible_minimum_bytes(ctx)
    if budget < minimum:
        raise PlanningError(f"device budget {budget} bytes is below the feasible minimum {minimum} bytes for this "
                            f"trace (bytes in use during interval {where}); raise the device budget to at least "
                            f"{minimum} bytes ({minimum / ctx.interval_peak.max():.1%} of the unconstrained peak)")
    if not ctx.tiers:
        raise PlanningError("the unplanned peak exceeds the device budget and the hardware model has no offload "
                            "tier; pick a tiers preset or pass a calibrated hardware file")
    occupancy = {t: np.zeros(n, dtype=np.int64) for t in ctx.tiers}
    slots = _Slots(ctx)
    decisions: List[Decision] = []
    windows: List[Tuple[int, int, int, int]] = []  # per decision: (s, length, kr, kf) in window positions
    taken = set()

    def held(iv) -> Tuple[int, int, bool]:
        s = iv.start_point % n
        b = iv.end_point
        return s, ((b - s) % n if s > b else b - s), s > b

    def over(s: int, a: int, length: int) -> bool:
        return any(bool((dev[x:y] > budget).any()) for x, y in _slices((s + a) % n, length, n))

    total = sum(iv.size_bytes for iv in ctx.intervals)
    unbounded = {t for t in ctx.tiers if ctx.tier_budgets[t] >= total}  # nothing to check for these

    def tier_room(tier: str, s: int, length: int, size: int) -> bool:
        return tier in unbounded or all(int(occupancy[tier][x:y].max(initial=0)) + size <= ctx.tier_budgets[tier] for x, y in _slices(s, length, n))

    def commit(j: int, iv, s: int, length: int, wraps: bool, kr: int, kf: int, action: Action, tier: str,
               reason: str, block: str = "", cost: float = 0.0) -> None:
        for x, y in _slices((s + kr) % n, kf - kr, n):
            dev[x:y] -= iv.size_bytes
        if action is Action.SWAP:
            for x, y in _slices(s, length, n):
                occupancy[tier][x:y] += iv.size_bytes
        pt = lambda k: iv.end_point if k >= length else (s + k) % n  # noqa: E731 - position -> point
        decisions.append(Decision(key=iv.key, record=iv.record, category=iv.category.value, size_bytes=iv.size_bytes,
                                  action=action, tier=tier, evict_point=s, free_point=pt(kr), prefetch_point=pt(kf),
                                  deadline_point=iv.end_point, wraps=wraps, recompute_block=block, recompute_s=cost,
                                  reason=reason))
        windows.append((s, length, kr, kf))
        taken.add(j)

    no_room: Dict[Tuple[str, int, int], float] = {}
    order = sorted(range(len(ctx.intervals)), key=lambda j: (-ctx.intervals[j].size_bytes * ctx.intervals[j].idle_s, j))
    # Hidden pass: only transfers the link schedule hides completely.
    for j in order:
        if dev.max() <= budget:
            break
        iv = ctx.intervals[j]
        s, length, wraps = held(iv)
        if length < 1 or not over(s, 0, length):
            continue
        full: List[str] = []
        for tier in ctx.tiers:
            out_s, back_s = ctx.round_trip(tier, iv.size_bytes)
            if out_s + back_s > iv.idle_s:
                continue  # G10: this tier's round trip does not fit the idle window
            if not tier_room(tier, s, length, iv.size_bytes):
                full.append(tier)
                continue
            memo = (tier, s, length)
            if iv.size_bytes >= no_room.get(memo, np.inf):
                continue  # a tensor no larger already found no slots in this window on this tier
            kr, out_takes, left_out = slots.walk("device", tier, s, length, out_s, True)
            kf, back_takes, left_back = slots.walk(tier, "device", s, length, back_s, False)
            if left_out > 0 or left_back > 0 or kr >= kf:
                # Slots only ever get taken, so no larger tensor will find room here either.
                no_room[memo] = min(iv.size_bytes, no_room.get(memo, np.inf))
                continue
            if not over(s, kr, kf - kr):
                continue
            slots.take("device", tier, out_takes)
            slots.take(tier, "device", back_takes)
            spill = f"; spilled past full {', '.join(full)}" if full else ""
            commit(j, iv, s, length, wraps, kr, kf, Action.SWAP, tier,
                   f"idle {_ms(iv.idle_s)} (points {s}->{iv.end_point}) vs round trip {_ms(out_s + back_s)} to {tier} "
                   f"(out {_ms(out_s)} + back {_ms(back_s)}): cheapest tier whose transfers the link schedule hides"
                   f"{spill}; off the device for {kf - kr} intervals")
            break
    if dev.max() > budget:
        _exposed_pass(ctx, dev, budget, taken, held, over, tier_room, slots, commit)
    if dev.max() > budget:
        _widen(ctx, dev, budget, decisions, windows)
    if dev.max() > budget:  # invariant: the feasible minimum was checked above
        raise AssertionError(f"lifetime left the device at {int(dev.max())} bytes over budget {budget}")
    return finish_plan(ctx, "lifetime", decisions)


def _widen(ctx: PlanContext, dev, budget: int, decisions: List[Decision], windows) -> None:
    """Last resort: stretch taken swaps over their whole idle window where still over budget.

    The feasible minimum assumes every tensor can be off for its whole window; a hidden swap
    holds it on the device while its transfers run, so stretching it (compute then waits) is
    what closes the remaining gap.
    """
    n = ctx.num_points
    for i, (s, length, kr, kf) in enumerate(windows):
        if dev.max() <= budget:
            return
        d = decisions[i]
        bad = [k for k in list(range(kr)) + list(range(kf, length)) if dev[(s + k) % n] > budget]
        if d.action is not Action.SWAP or not bad:
            continue
        new_kr, new_kf = min(kr, bad[0]), max(kf, bad[-1] + 1)
        for a, m in ((new_kr, kr - new_kr), (kf, new_kf - kf)):
            for x, y in _slices((s + a) % n, m, n):
                dev[x:y] -= d.size_bytes
        pt = lambda k: d.deadline_point if k >= length else (s + k) % n  # noqa: E731 - position -> point
        decisions[i] = Decision(**{**d.__dict__, "free_point": pt(new_kr), "prefetch_point": pt(new_kf),
                                   "reason": d.reason + "; widened to fit the budget (compute waits for its transfers)"})
        windows[i] = (s, length, new_kr, new_kf)


def _exposed_pass(ctx: PlanContext, dev, budget, taken, held, over, tier_room, slots, commit) -> None:
    """Swaps whose transfers compute must partly wait for, or recomputes, cheapest per byte first."""
    n = ctx.num_points
    blocks = recompute_blocks(ctx.trace)
    fastest = sorted(ctx.tiers, key=lambda t: sum(ctx.round_trip(t, 1 << 20)))
    options = []
    for j, iv in enumerate(ctx.intervals):
        s, length, wraps = held(iv)
        if j in taken or length < 1:
            continue
        out_s, back_s = ctx.round_trip(fastest[0], iv.size_bytes)
        swap_cost = max(0.0, out_s + back_s - iv.idle_s) + _EPS
        blk = block_of(iv.key) if iv.category.value == "activation" else None
        rc = blocks.get(blk) if blk is not None else None
        use_recompute = rc is not None and rc < swap_cost and not wraps
        options.append(((rc if use_recompute else swap_cost) / iv.size_bytes, j, use_recompute, rc))
    for _, j, use_recompute, rc in sorted(options):
        if dev.max() <= budget:
            return
        iv = ctx.intervals[j]
        s, length, wraps = held(iv)
        if not over(s, 0, length):
            continue
        # The absent range must cover every over-budget interval of the idle window.
        bad = [k for k in range(length) if dev[(s + k) % n] > budget]
        if use_recompute:
            blk = block_of(iv.key)
            commit(j, iv, s, length, wraps, 0, length, Action.RECOMPUTE, "",
                   f"idle {_ms(iv.idle_s)} is too short to hide a swap; re-running {blk[0]}[{blk[1]}] costs "
                   f"{_ms(rc)}, less than the exposed transfer time", f"{blk[0]}[{blk[1]}]", rc)
            continue
        for tier in fastest:
            if not tier_room(tier, s, length, iv.size_bytes):
                continue
            out_s, back_s = ctx.round_trip(tier, iv.size_bytes)
            kr, out_takes, _ = slots.walk("device", tier, s, length, out_s, True)
            kf, back_takes, _ = slots.walk(tier, "device", s, length, back_s, False)
            kr, kf = min(kr, bad[0]), max(kf, bad[-1] + 1)
            slots.take("device", tier, out_takes)
            slots.take(tier, "device", back_takes)
            commit(j, iv, s, length, wraps, kr, kf, Action.SWAP, tier,
                   f"idle {_ms(iv.idle_s)} (points {s}->{iv.end_point}) is shorter than the round trip "
                   f"{_ms(out_s + back_s)} to {tier} (fastest tier with room); needed to fit the budget, compute "
                   f"waits for the part the link cannot hide")
            break
