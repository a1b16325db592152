"""From a profiled trace to what the executor needs: the plan, the one iteration it was made for,
its schedule, and the blocks it re-runs.

Kept apart from :mod:`tierflow.offload.runtime.offload_runtime`'s control flow (when to profile,
plan, fall back): this changes when planning inputs do (size reservations, pinned categories).

Note [size reservations] (in :mod:`tierflow.profiling.shapes`) is applied here: a key whose size
varied among every iteration profiled so far, or whose family's did, is planned at its
reservation, so later iterations with other routings or lengths still follow the plan.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import FrozenSet, Mapping, Set, Tuple

from tierflow.offload.core.hardware import HardwareModel
from tierflow.offload.plan import (
                                   Action,
                                   OffloadPlan,
                                   PlanError,
                                   PlanningError,
                                   forward_spans,
                                   make_plan,
                                   parse_block,
                                   saved_within,
                                   validate_plan,
                                   with_reruns,
)
from tierflow.offload.runtime._schedule import Schedule, make_schedule, one_iteration, pin_unmovable
from tierflow.offload.runtime.config import OffloadConfig
from tierflow.profiling import check_stability, latest_frees, memory_timeline
from tierflow.profiling.shapes import SizeRange, plan_reservations, reserve_sizes, temporary_scopes
from tierflow.profiling.trace import LifetimeTrace

__all__ = ["Planned", "plan_trace"]


@dataclass(frozen=True)
class Planned:
    """A plan and what executing it takes.

    Attributes:
        plan: The validated plan.
        trace: The one iteration it was made for, at reserved sizes.
        schedule: The plan's decisions indexed by point.
        recompute: ``(module path, call)`` of the blocks it re-runs.
        skipped: Decisions inside recomputed blocks (nothing to move there).
        num_reserved: Keys planned at a reservation rather than their traced size.
    """

    plan: OffloadPlan
    trace: LifetimeTrace
    schedule: Schedule
    recompute: Set[Tuple[str, int]]
    skipped: Set[int]
    num_reserved: int


def plan_trace(trace: LifetimeTrace, sizes: Mapping[str, SizeRange], config: OffloadConfig,
               hardware: HardwareModel, movable: FrozenSet[str]) -> Planned:
    """Plan the last iteration of ``trace`` with every varying key at its reservation.

    Args:
        trace: The profiled iterations.
        sizes: Per key, the sizes seen so far (this trace's, earlier profiles', and any seen
            larger on a planned step).
        config: The ``offload`` config (policy, budgets, ``shape_headroom``).
        hardware: What the planner plans for.
        movable: Categories the runtime may move; the rest are pinned.

    Raises:
        PlanningError: no plan of ``config.policy`` keeps the device under its budget.
        PlanError: the plan made is invalid for the trace (a bug in a policy).
    """
    reserved = plan_reservations(trace, sizes, config.shape_headroom)
    stability = check_stability(reserve_sizes(trace, {k: hi for k, (lo, hi) in sizes.items() if lo != hi}))
    if not stability.static:
        warnings.warn(f"tierflow offload: the profiled iterations differ ({stability.describe()}); planning the "
                      "last one, iterations that diverge from it fall back", stacklevel=5)
    traced = pin_unmovable(one_iteration(latest_frees(trace), -1), movable)  # Note [frees that jitter]
    budgets = config.budgets()
    if reserved and budgets.device_bytes is None and budgets.device_fraction is not None:
        # A fraction is of the peak the profile measured, not of one inflated by reservations.
        budgets = replace(budgets, device_bytes=int(budgets.device_fraction * memory_timeline(traced).peak.total_bytes))
    one = reserve_sizes(traced, reserved)
    timeline = memory_timeline(one)  # one timeline for planning, validation and the schedule
    plan = make_plan(one, hardware, budgets, config.policy, timeline=timeline)
    if not plan.fits:
        raise PlanningError(
            f"policy {plan.policy!r} cannot keep the device under its budget: device budget "
            f"{plan.device_budget_bytes} bytes, the plan's peak {plan.predicted_device_peak_bytes} bytes "
            f"(unconstrained peak {plan.unconstrained_peak_bytes} bytes); raise offload.device_budget_bytes/"
            f"device_budget_fraction or use offload.policy=lifetime")
    recompute = {parse_block(b) for b in plan.recomputed_blocks}
    # Validated and accounted as the iteration runs: with its re-runs (Note [a re-run re-makes the
    # whole block]); the executor follows the points and keys of ``one``, which re-runs leave alone.
    executed = with_reruns(one, recompute)
    if executed is not one:
        timeline = memory_timeline(executed)
    problems = validate_plan(plan, executed, hardware, timeline=timeline)
    if problems:
        raise PlanError(f"the {plan.policy} plan is invalid ({len(problems)} problems): " + "; ".join(problems[:5]))
    schedule = make_schedule(executed, plan, timeline=timeline, reserved=frozenset(reserved),
                             scopes=temporary_scopes(one, reserved))
    return Planned(plan=plan, trace=one, schedule=schedule, recompute=recompute,
                   skipped=_inside_recomputed(one, plan, recompute),
                   num_reserved=sum(1 for r in one.tensors if r.key in reserved))


def _inside_recomputed(trace: LifetimeTrace, plan: OffloadPlan, blocks: Set[Tuple[str, int]]) -> Set[int]:
    """Swap decisions of activations saved by a module call inside a recomputed block's forward
    (checkpointing keeps those from ever being saved, so there is nothing to move). Not those the
    block made and a module after it saved: a block's output is saved as traced and moves as
    planned (skipped, a dropout block's output stayed resident while the plan counted it away:
    32 KiB over the budget on the dropout GPT of ``tests/test_accounting.py``)."""
    spans = forward_spans(trace)
    regions = [spans[block] for block in blocks if block in spans]
    return {i for i, d in enumerate(plan.decisions)
            if d.action is Action.SWAP and d.category == "activation"
            and any(saved_within(spans, d.key, a, b) for a, b in regions)}


# Note [a plan that moves nothing]: on a CPU run the device is RAM, so the runtime has glibc map
# every allocation of 1 MiB or more on its own (``map_large_allocations``): a freed tensor leaves
# RSS at once, and the budget means resident memory. Each such allocation then faults in fresh
# zeroed pages, every step. When the budget is far above what the run needs, that buys nothing:
# a plan that moves and re-runs nothing, with its budget at least 1.5x its peak, lets glibc keep
# freed blocks under 8 MiB for reuse (glibc on its own keeps blocks up to 32 MiB). Measured on the
# FSDP2 benchmark (GPT d_model 768 x 8, 2 ranks, 1300 MiB budget, tracked peak 606 MiB; three
# runs each on a noisy 2-vCPU machine): a median step of 2.56 s (2.12-3.18) and 626-694 MiB of
# peak RSS at 1 MiB, 2.25 s (2.22-2.33) and 750-783 MiB at 8 MiB. Never under a budget that
# binds: at 200 MiB the same model held 346 MiB of RSS at 1 MiB and 1,323 MiB at 8 MiB, its heap
# fragmented by the tensors paged in and out.
CACHED_BLOCK_BYTES = 8 << 20
MAPPED_BLOCK_BYTES = 1 << 20


def host_block_threshold(plan: OffloadPlan) -> int:
    """The size from which a CPU run's allocations are mapped on their own under ``plan``
    (Note [a plan that moves nothing])."""
    moves = plan.recomputed_blocks or any(d.action is Action.SWAP for d in plan.decisions)
    roomy = 2 * plan.device_budget_bytes >= 3 * plan.predicted_device_peak_bytes
    return CACHED_BLOCK_BYTES if roomy and not moves else MAPPED_BLOCK_BYTES

