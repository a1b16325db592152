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
   than that wait (Capuchin/POET), through the block that created it and never in a block nested
   in another recomputed one (Note [recompute regions] in :mod:`tierflow.offload.plan.context`).
5. If blocks were re-run, the passes run again on the trace with those re-runs as uses of what
   the blocks' forwards read, re-running only those blocks (Note [recompute reads parameters
   early] in :mod:`tierflow.offload.plan._reruns`; :func:`~tierflow.offload.plan.context.plan_with_reruns`).

Note [bandwidth slots]: as in G10, each link can move ``duration_s[p]`` seconds of transfer
during interval ``p``. A transfer consumes those slots (its latency included) forward from the
evict point or backward from the deadline; the device is free of the tensor between the last slot
of its offload and the first slot of its prefetch. Link capacity is shared by all decisions, so a
busy link pushes a prefetch earlier (and keeps the tensor on the device longer) or to another tier.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, FrozenSet, List, Optional, Tuple

import numpy as np

from tierflow.offload.plan._slots import EPS as _EPS
from tierflow.offload.plan._slots import LinkSlots, slices
from tierflow.offload.plan.context import (
    PlanContext,
    RecomputeRegions,
    feasible_minimum_bytes,
    finish_plan,
    plan_with_reruns,
)
from tierflow.offload.plan.types import Action, Decision, OffloadPlan, PlanningError

__all__ = ["plan_lifetime"]



def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms"


def plan_lifetime(ctx: PlanContext) -> OffloadPlan:
    """The default policy (see the module docstring). Raises PlanningError below the feasible minimum.

    When the cheapest-tier-first plan leaves compute waiting (the budget forced exposed swaps),
    the same passes run again with the fastest tier first and the plan predicted faster is kept:
    under pressure, bandwidth matters more than where the bytes are cheapest.
    """
    return plan_with_reruns(ctx, _plan_tier_orders)


def _plan_tier_orders(ctx: PlanContext, only: Optional[FrozenSet[Tuple[str, int]]]) -> OffloadPlan:
    """Cheapest tier first, then fastest first if compute waits; re-running only blocks of ``only``."""
    plan = _plan_lifetime(ctx, only)
    if plan.predicted_step_s <= plan.unconstrained_step_s or len(ctx.tiers) < 2:
        return plan
    fastest = sorted(ctx.tiers, key=lambda t: (sum(ctx.round_trip(t, 1 << 20)), t))
    other = _plan_lifetime(replace(ctx, tiers=fastest), only)
    if other.predicted_step_s < plan.predicted_step_s:
        return replace(other, notes=other.notes + ("fastest tier first: predicted faster than cheapest first "
                                                   "under this budget",))
    return plan


def _plan_lifetime(ctx: PlanContext, only: Optional[FrozenSet[Tuple[str, int]]] = None) -> OffloadPlan:
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
    slots = LinkSlots(ctx)
    decisions: List[Decision] = []
    windows: List[Tuple[int, int, int, int]] = []  # per decision: (s, length, kr, kf) in window positions
    taken = set()
    recompute = only is None or bool(only)
    regions = RecomputeRegions(ctx.trace, enabled=recompute, only=only)

    def held(iv) -> Tuple[int, int, bool]:
        s = iv.start_point % n
        b = iv.end_point
        return s, ((b - s) % n if s > b else b - s), s > b

    def over(s: int, a: int, length: int) -> bool:
        return any(bool((dev[x:y] > budget).any()) for x, y in slices((s + a) % n, length, n))

    total = sum(iv.size_bytes for iv in ctx.intervals)
    unbounded = {t for t in ctx.tiers if ctx.tier_budgets[t] >= total}  # nothing to check for these

    def tier_room(tier: str, s: int, length: int, size: int) -> bool:
        return tier in unbounded or all(int(occupancy[tier][x:y].max(initial=0)) + size <= ctx.tier_budgets[tier] for x, y in slices(s, length, n))

    def commit(j: int, iv, s: int, length: int, wraps: bool, kr: int, kf: int, action: Action, tier: str,
               reason: str, block: Optional[Tuple[str, int]] = None, cost: float = 0.0) -> None:
        for x, y in slices((s + kr) % n, kf - kr, n):
            dev[x:y] -= iv.size_bytes
        if action is Action.SWAP:
            for x, y in slices(s, length, n):
                occupancy[tier][x:y] += iv.size_bytes
        pt = lambda k: iv.end_point if k >= length else (s + k) % n  # noqa: E731 - position -> point
        decisions.append(Decision(key=iv.key, record=iv.record, category=iv.category.value, size_bytes=iv.size_bytes,
                                  action=action, tier=tier, evict_point=s, free_point=pt(kr), prefetch_point=pt(kf),
                                  deadline_point=iv.end_point, wraps=wraps,
                                  recompute_block=f"{block[0]}[{block[1]}]" if block else "", recompute_s=cost,
                                  reason=reason))
        windows.append((s, length, kr, kf))
        taken.add(j)
        regions.add(iv, block)

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
        _exposed_pass(ctx, dev, budget, taken, held, over, tier_room, slots, commit, regions)
    if dev.max() > budget:
        _widen(ctx, dev, budget, decisions, windows)
    if dev.max() > budget and recompute:
        # Note [recompute regions]: a re-run block keeps its inputs, and those saved inside it can
        # then not leave; swaps alone always reach the feasible minimum.
        return _plan_lifetime(ctx, frozenset())
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
            for x, y in slices((s + a) % n, m, n):
                dev[x:y] -= d.size_bytes
        pt = lambda k: d.deadline_point if k >= length else (s + k) % n  # noqa: E731 - position -> point
        decisions[i] = Decision(**{**d.__dict__, "free_point": pt(new_kr), "prefetch_point": pt(new_kf),
                                   "reason": d.reason + "; widened to fit the budget (compute waits for its transfers)"})
        windows[i] = (s, length, new_kr, new_kf)


def _exposed_pass(ctx: PlanContext, dev, budget, taken, held, over, tier_room, slots, commit,
                  regions: RecomputeRegions) -> None:
    """Swaps whose transfers compute must partly wait for, or recomputes, cheapest per byte first.

    A swap of an activation saved inside a block that could be re-run comes after every recompute:
    taken first it would rule that block out (Note [recompute regions]), and a small, nearly free
    swap of a block's input would then cost the exposed swaps of all the block's activations.
    """
    n = ctx.num_points
    fastest = sorted(ctx.tiers, key=lambda t: sum(ctx.round_trip(t, 1 << 20)))
    options = []
    for j, iv in enumerate(ctx.intervals):
        s, length, wraps = held(iv)
        if j in taken or length < 1:
            continue
        out_s, back_s = ctx.round_trip(fastest[0], iv.size_bytes)
        swap_cost = max(0.0, out_s + back_s - iv.idle_s) + _EPS
        blk = regions.block_for(iv) if not wraps else None
        rc = regions.cost_s[blk] if blk is not None else None
        use_recompute = rc is not None and rc < swap_cost
        options.append([(rc if use_recompute else swap_cost) / iv.size_bytes, j, use_recompute, rc])
    candidates = {regions.block_for(ctx.intervals[o[1]]) for o in options if o[2]}
    for o in options:
        o.insert(0, not o[2] and regions.saved_inside(ctx.intervals[o[1]], candidates))
    for _, _, j, use_recompute, rc in sorted(options):
        if dev.max() <= budget:
            return
        iv = ctx.intervals[j]
        s, length, wraps = held(iv)
        if not over(s, 0, length):
            continue
        # The absent range must cover every over-budget interval of the idle window.
        bad = [k for k in range(length) if dev[(s + k) % n] > budget]
        # Note [recompute regions]: a block already re-run re-creates it at no further cost; one
        # nested in or around a chosen block, or around a swapped activation, cannot be re-run.
        along = regions.chosen_for(iv) if not wraps else None
        if along is not None:
            commit(j, iv, s, length, wraps, 0, length, Action.RECOMPUTE, "",
                   f"idle {_ms(iv.idle_s)}; created inside {along[0]}[{along[1]}], which is re-run already",
                   along, regions.cost_s[along])
            continue
        blk = regions.block_for(iv) if use_recompute else None
        if blk is not None and regions.allows(iv, blk):
            commit(j, iv, s, length, wraps, 0, length, Action.RECOMPUTE, "",
                   f"idle {_ms(iv.idle_s)} is too short to hide a swap; re-running {blk[0]}[{blk[1]}] costs "
                   f"{_ms(rc)}, less than the exposed transfer time", blk, rc)
            continue
        if not regions.allows(iv):
            continue  # saved inside a re-run block, which keeps it (an input of the block) or frees it
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
