"""Baseline policies the ``lifetime`` planner is measured against.

* ``none``: nothing moves.
* ``all_host``: every saved activation goes to host memory, like ``torch.autograd.graph.save_on_cpu``:
  copied synchronously when saved (compute waits for the copy), fetched synchronously when unpacked.
* ``zero_offload``: optimizer states and gradients wait on host between uses. The CPU update itself
  is not modelled: states come back for the update, fetched one point ahead like DeepSpeed's
  pipelined swapper.
* ``zero_infinity``: parameters and optimizer states wait on NVMe (striped over every ``nvme:*``
  tier), written synchronously, prefetched one point ahead.
* ``belady``: reactive paging. Walking the iteration, whenever the device is over budget evict the
  idle tensor whose next use is furthest in the future; compute waits for the eviction and for the
  on-demand fetch at the next use.

Each is a pure function of a :class:`~tierflow.offload.plan.context.PlanContext`; none raises for a budget it
cannot meet: the plan's ``fits`` says so.
"""

from __future__ import annotations

import heapq
from typing import Dict, List, Sequence

from tierflow.offload.core.names import kind_of
from tierflow.offload.plan.context import PlanContext, finish_plan
from tierflow.offload.plan.types import Action, Decision, OffloadPlan, PlanningError

__all__ = ["BASELINES", "plan_all_host", "plan_belady", "plan_none", "plan_zero_infinity", "plan_zero_offload"]


def plan_none(ctx: PlanContext) -> OffloadPlan:
    return finish_plan(ctx, "none", (), ["offloading is off"])


def _need(ctx: PlanContext, policy: str, prefixes: Sequence[str]) -> List[str]:
    tiers = [t for t in ctx.tiers if kind_of(t) in prefixes]
    if not tiers:
        raise PlanningError(f"policy {policy!r} needs a {' or '.join(prefixes)} tier linked both ways to the device; "
                            f"the hardware model has: {', '.join(ctx.tiers) or 'none'}")
    return tiers


def _eager(ctx: PlanContext, policy: str, categories: Sequence[str], tiers: Sequence[str], lookahead: int,
           why: str) -> OffloadPlan:
    """Every idle interval of ``categories`` to ``tiers`` (round robin); freed at once, fetched ahead."""
    n = ctx.num_points
    decisions: List[Decision] = []
    for iv in ctx.intervals:
        if iv.category.value not in categories:
            continue
        s, b = iv.start_point % n, iv.end_point
        if s == b:
            continue
        tier = tiers[len(decisions) % len(tiers)]
        # Prefetch ``lookahead`` points before the use, never before the evict.
        length = (b - s) % n if s > b else b - s
        f = (b - min(lookahead, length)) % n
        decisions.append(Decision(key=iv.key, record=iv.record, category=iv.category.value, size_bytes=iv.size_bytes,
                                  action=Action.SWAP, tier=tier, evict_point=s, free_point=s, prefetch_point=f,
                                  deadline_point=b, wraps=s > b, reason=why.format(tier=tier)))
    return finish_plan(ctx, policy, decisions)


def plan_all_host(ctx: PlanContext) -> OffloadPlan:
    tier = _need(ctx, "all_host", ["host"])[0]
    return _eager(ctx, "all_host", ["activation"], [tier], 0,
                  "save_on_cpu: copied to {tier} when saved, fetched when unpacked for backward")


def plan_zero_offload(ctx: PlanContext) -> OffloadPlan:
    tiers = _need(ctx, "zero_offload", ["host"])
    return _eager(ctx, "zero_offload", ["optimizer_state", "grad"], tiers[:1], 1,
                  "ZeRO-Offload: optimizer states and gradients wait on {tier}, fetched one point ahead")


def plan_zero_infinity(ctx: PlanContext) -> OffloadPlan:
    tiers = _need(ctx, "zero_infinity", ["nvme"])
    return _eager(ctx, "zero_infinity", ["param", "optimizer_state"], tiers, 1,
                  "ZeRO-Infinity: parameters and optimizer states wait on {tier} (striped), fetched one point ahead")


def plan_belady(ctx: PlanContext) -> OffloadPlan:
    n, budget = ctx.num_points, ctx.device_budget
    if ctx.interval_peak.max() <= budget:
        return finish_plan(ctx, "belady", (), ["the unplanned peak fits: nothing is evicted"])
    tiers = sorted(ctx.tiers, key=lambda t: sum(ctx.round_trip(t, 1 << 20)))
    if not tiers:
        raise PlanningError("policy 'belady' needs an offload tier linked both ways to the device")
    dev = ctx.interval_peak.copy()
    occupancy = {t: [0] * n for t in tiers}
    # Pieces that become evictable at a point: (start, end position on an unrolled axis, interval index).
    starts: Dict[int, List[int]] = {}
    heap: List[tuple] = []
    for j, iv in enumerate(ctx.intervals):
        s, b = iv.start_point % n, iv.end_point
        if s > b:  # wrapped: evictable from the iteration start until b, and again from s on
            heap.append((-b, 0, j))
            starts.setdefault(s, []).append(j)
        elif s < b:
            starts.setdefault(s, []).append(j)
    heapq.heapify(heap)
    evicted = set()
    decisions: List[Decision] = []
    for p in range(n):
        for j in starts.get(p, ()):
            iv = ctx.intervals[j]
            end = iv.end_point if iv.start_point % n < iv.end_point else n + iv.end_point
            heapq.heappush(heap, (-end, p, j))
        while dev[p] > budget and heap:
            neg_end, _, j = heapq.heappop(heap)
            end = -neg_end
            if end <= p or j in evicted:
                continue
            iv = ctx.intervals[j]
            span = [(p, min(end, n))] + ([(0, end - n)] if end > n else [])
            tier = next((t for t in tiers if all(max(occupancy[t][x:y], default=0) + iv.size_bytes
                                                 <= ctx.tier_budgets[t] for x, y in span)), None)
            if tier is None:
                continue
            evicted.add(j)
            for x, y in span:
                dev[x:y] -= iv.size_bytes
                for q in range(x, y):
                    occupancy[tier][q] += iv.size_bytes
            decisions.append(Decision(key=iv.key, record=iv.record, category=iv.category.value,
                                      size_bytes=iv.size_bytes, action=Action.SWAP, tier=tier, evict_point=p,
                                      free_point=p, prefetch_point=iv.end_point, deadline_point=iv.end_point,
                                      wraps=end > n,
                                      reason=f"over budget at point {p}: evicted to {tier} as the idle tensor used "
                                             f"furthest in the future (point {iv.end_point}); fetched on demand"))
    return finish_plan(ctx, "belady", decisions)


BASELINES = {"none": plan_none, "all_host": plan_all_host, "zero_offload": plan_zero_offload,
             "zero_infinity": plan_zero_infinity, "belady": plan_belady}
