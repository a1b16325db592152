"""The ``ilp`` policy: an exact mixed-integer program over the same choices ``lifetime`` makes.

Every idle interval ``j`` may stay, or take one option:

* *hidden swap* to tier ``k``: the offload takes link slots forward from the evict point and the
  prefetch slots backward from the deadline (Note [bandwidth slots] in
  :mod:`tierflow.offload.plan.policy_lifetime`, on an otherwise idle link); costs no time; allowed when the
  round trip fits the idle window;
* *exposed swap* to tier ``k``: off the device for the whole window, compute waits for both
  transfers (cost ``out_s + back_s``);
* *recompute* (activations created and saved inside a module call's forward): off for the whole
  window, costs the forward compute of the innermost such call.

Constraints: at most one option per interval; a recompute excludes every option of another
interval whose activation was saved inside its block, save a recompute through the same block
(Note [recompute regions] in :mod:`tierflow.offload.plan.context`); in every over-budget interval
the bytes taken off the device cover the excess; the hidden swaps' slots fit each link's capacity
per interval; each tier's occupancy stays within its budget. Objective: minimise the summed cost
(a tie-break of ``1e-15`` s per byte prefers moving less). Solved with ``scipy.optimize.milp``
(HiGHS); meant for small traces, to measure how far ``lifetime`` is from this optimum.
"""

from __future__ import annotations

import bisect
from typing import Dict, FrozenSet, List, Optional, Tuple

import numpy as np

from tierflow.offload.plan._slots import LinkSlots, slices
from tierflow.offload.plan.context import (
    PlanContext,
    RecomputeRegions,
    feasible_minimum_bytes,
    finish_plan,
    plan_with_reruns,
)
from tierflow.offload.plan.types import Action, Decision, OffloadPlan, PlanningError

__all__ = ["MAX_ILP_OPTIONS", "plan_ilp"]

#: Above this many options the program is refused: ``ilp`` is a yardstick for small traces.
MAX_ILP_OPTIONS = 20_000
_TIME_LIMIT_S = 60.0


def plan_ilp(ctx: PlanContext) -> OffloadPlan:
    """The optimum over the options above. Raises PlanningError when too big or infeasible.

    Re-run blocks read what their forwards read where they re-run (Note [recompute reads
    parameters early] in :mod:`tierflow.offload.plan._reruns`): when the optimum re-runs blocks,
    the program is solved again with those reads as uses, re-running only those blocks
    (:func:`~tierflow.offload.plan.context.plan_with_reruns`); the result is the optimum for the
    blocks it re-runs.
    """
    return plan_with_reruns(ctx, _plan_ilp)


def _plan_ilp(ctx: PlanContext, only: Optional[FrozenSet[Tuple[str, int]]]) -> OffloadPlan:
    # scipy is imported only when the ilp policy is asked for: the other policies do not need it.
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, budget = ctx.num_points, ctx.device_budget
    if ctx.interval_peak.max() <= budget:
        return finish_plan(ctx, "ilp", (), ["the unplanned peak fits the device budget: nothing moves"])
    minimum, where = feasible_minimum_bytes(ctx)
    if budget < minimum:
        raise PlanningError(f"device budget {budget} bytes is below the feasible minimum {minimum} bytes for this "
                            f"trace (bytes in use during interval {where}); raise the device budget to at least "
                            f"{minimum} bytes")
    regions = RecomputeRegions(ctx.trace, only=only)
    fresh = LinkSlots(ctx)  # walks on idle links: never `take`n, so every option sees full capacity
    # option: (interval j, action, tier, kr, kf, cost, {link: [(q, seconds)]})
    options: List[Tuple[int, Action, str, int, int, float, Dict[str, list]]] = []
    for j, iv in enumerate(ctx.intervals):
        s, b = iv.start_point % n, iv.end_point
        length = (b - s) % n if s > b else b - s
        if length < 1:
            continue
        for tier in ctx.tiers:
            out_s, back_s = ctx.round_trip(tier, iv.size_bytes)
            if out_s + back_s <= iv.idle_s:
                kr, takes_out, left_out = fresh.walk("device", tier, s, length, out_s, True)
                kf, takes_back, left_back = fresh.walk(tier, "device", s, length, back_s, False)
                if left_out <= 0 and left_back <= 0 and kr < kf:
                    options.append((j, Action.SWAP, tier, kr, kf, 0.0,
                                    {f"device->{tier}": takes_out, f"{tier}->device": takes_back}))
            options.append((j, Action.SWAP, tier, 0, length, out_s + back_s, {}))
        blk = regions.block_for(iv) if s < b else None
        if blk is not None:
            options.append((j, Action.RECOMPUTE, "", 0, length, regions.cost_s[blk], {}))
    if len(options) > MAX_ILP_OPTIONS:
        raise PlanningError(f"ilp is for small traces: this one gives {len(options)} options (limit "
                            f"{MAX_ILP_OPTIONS}); use offload.policy=lifetime")
    rows, cols, vals, lb, ub = [], [], [], [], []

    def row(entries: List[Tuple[int, float]], lo: float, hi: float) -> None:
        r = len(lb)
        for col, v in entries:
            rows.append(r)
            cols.append(col)
            vals.append(v)
        lb.append(lo)
        ub.append(hi)

    by_interval: Dict[int, List[int]] = {}
    absent: Dict[int, List[Tuple[int, float]]] = {}
    held: Dict[Tuple[str, int], List[Tuple[int, float]]] = {}
    link_use: Dict[Tuple[str, int], List[Tuple[int, float]]] = {}
    for o, (j, action, tier, kr, kf, _, takes) in enumerate(options):
        iv = ctx.intervals[j]
        s, b = iv.start_point % n, iv.end_point
        by_interval.setdefault(j, []).append(o)
        for x, y in slices((s + kr) % n, kf - kr, n):
            for q in range(x, y):
                if ctx.interval_peak[q] > budget:
                    absent.setdefault(q, []).append((o, float(iv.size_bytes)))
        if action is Action.SWAP:
            for x, y in slices(s, (b - s) % n if s > b else b - s, n):
                for q in range(x, y):
                    held.setdefault((tier, q), []).append((o, float(iv.size_bytes)))
        for link, (where, amounts) in takes.items():
            for q, sec in zip(where.tolist(), amounts.tolist()):
                link_use.setdefault((link, q), []).append((o, sec))
    for ids in by_interval.values():
        row([(o, 1.0) for o in ids], 0.0, 1.0)
    for q, entries in absent.items():
        row(entries, float(ctx.interval_peak[q] - budget), np.inf)
    for (tier, q), entries in held.items():
        if sum(v for _, v in entries) > ctx.tier_budgets[tier]:
            row(entries, 0.0, float(ctx.tier_budgets[tier]))
    for (link, q), entries in link_use.items():
        row(entries, 0.0, float(ctx.duration_s[q]))
    _recompute_regions(ctx, regions, options, row)
    cost = np.array([c + 1e-15 * ctx.intervals[j].size_bytes for j, _, _, _, _, c, _ in options])
    a = coo_matrix((vals, (rows, cols)), shape=(len(lb), len(options))).tocsr()
    res = milp(cost, integrality=np.ones(len(options)), bounds=(0, 1),
               constraints=LinearConstraint(a, np.array(lb), np.array(ub)),
               options={"time_limit": _TIME_LIMIT_S})
    if res.x is None:
        raise PlanningError(f"ilp found no solution ({res.message}); use offload.policy=lifetime")
    decisions = []
    for o in np.flatnonzero(res.x > 0.5):
        j, action, tier, kr, kf, c, takes = options[int(o)]
        iv = ctx.intervals[j]
        s, b = iv.start_point % n, iv.end_point
        length = (b - s) % n if s > b else b - s
        pt = lambda k: b if k >= length else (s + k) % n  # noqa: E731 - position -> point
        blk = regions.block_for(iv)
        how = ("recompute" if action is Action.RECOMPUTE else "hidden swap" if takes else "exposed swap")
        decisions.append(Decision(key=iv.key, record=iv.record, category=iv.category.value, size_bytes=iv.size_bytes,
                                  action=action, tier=tier, evict_point=s, free_point=pt(kr), prefetch_point=pt(kf),
                                  deadline_point=b, wraps=s > b,
                                  recompute_block=f"{blk[0]}[{blk[1]}]" if action is Action.RECOMPUTE else "",
                                  recompute_s=c if action is Action.RECOMPUTE else 0.0,
                                  reason=f"ilp optimum: {how}{' to ' + tier if tier else ''}, idle "
                                         f"{iv.idle_s * 1e3:.3f} ms, cost {c * 1e3:.3f} ms"))
    return finish_plan(ctx, "ilp", decisions, [f"HiGHS: {res.message}"])


def _recompute_regions(ctx: PlanContext, regions: RecomputeRegions, options, row) -> None:
    """Note [recompute regions]: a recompute through block ``B`` and an option of another interval
    whose activation was saved inside ``B`` (a swap, or a recompute through another block: nested
    in ``B`` or around it) exclude each other. One row per recompute option and such interval (an
    interval takes at most one option, so their sum is at most 1 too)."""
    by_start: Dict[int, List[int]] = {}  # start point of the saving module's span -> options
    block = {o: regions.block_for(ctx.intervals[j]) for o, (j, action, *_) in enumerate(options)
             if action is Action.RECOMPUTE}
    for o, (j, *_) in enumerate(options):
        saver, _ = regions.origin(ctx.intervals[j])
        if saver is not None:
            by_start.setdefault(saver[0], []).append(o)
    starts = sorted(by_start)
    for o, blk in block.items():
        a, b = regions.spans[blk]
        j = options[o][0]
        clash: Dict[int, List[int]] = {}
        # Spans nest or are disjoint: one starting inside B's lies inside it. A recompute through a
        # block around B names an activation saved outside B; its own row catches the pair.
        for c in starts[bisect.bisect_left(starts, a):bisect.bisect_left(starts, b)]:
            for other in by_start[c]:
                if options[other][0] != j and block.get(other) != blk:
                    clash.setdefault(options[other][0], []).append(other)
        for ids in clash.values():
            row([(o, 1.0)] + [(x, 1.0) for x in ids], 0.0, 1.0)
