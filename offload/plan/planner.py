"""``make_plan``: choose a policy by name and turn a trace, a HardwareModel and budgets into a plan.

Deciding is pure: everything here runs without a device. Policies live in
:mod:`tierflow.offload.plan.policy_lifetime` (the default), :mod:`tierflow.offload.plan.policy_baselines` and
:mod:`tierflow.offload.plan.policy_ilp`; they share one
:class:`~tierflow.offload.plan.context.PlanContext` per planning pass and end in
:func:`~tierflow.offload.plan.context.finish_plan`. This module is only the registry: it imports
the policies, never the other way round.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from tierflow.offload.core.hardware import HardwareModel
from tierflow.offload.plan.context import Budgets, PlanContext, build_context
from tierflow.offload.plan.policy_baselines import BASELINES
from tierflow.offload.plan.policy_ilp import plan_ilp
from tierflow.offload.plan.policy_lifetime import plan_lifetime
from tierflow.offload.plan.types import OffloadPlan, PlanningError
from tierflow.profiling.timeline import MemoryTimeline

__all__ = ["POLICIES", "make_plan"]


#: Every policy by name (``offload.policy``, ``tierflow plan --policy``): a pure function of the context.
_TABLE: Dict[str, Callable[[PlanContext], OffloadPlan]] = {"lifetime": plan_lifetime, **BASELINES, "ilp": plan_ilp}

#: Policy names accepted by :func:`make_plan` (and ``offload.policy``).
POLICIES = tuple(_TABLE)


def make_plan(trace, hardware: Optional[HardwareModel], budgets: Budgets, policy: str = "lifetime", *,
              timeline: Optional[MemoryTimeline] = None) -> OffloadPlan:
    """Plan where every idle tensor waits and when it comes back.

    Args:
        trace: A :class:`~tierflow.profiling.trace.LifetimeTrace` (one iteration is planned as a cycle).
        hardware: Tiers and links to plan for (None: nothing can move).
        budgets: Device and tier budgets.
        policy: One of :data:`POLICIES`.
        timeline: The trace's memory timeline, when the caller has it (one per planning pass).

    Returns:
        The :class:`~tierflow.offload.plan.types.OffloadPlan`, with its simulated predictions.

    Raises:
        PlanningError: unknown policy, inconsistent trace, or (for ``lifetime``) a device budget
            below the feasible minimum, stating that minimum.

    Example:
        >>> plan = make_plan(trace, hw, Budgets(device_fraction=0.5))  # doctest: +SKIP
        >>> plan.fits, round(plan.slowdown, 3)  # doctest: +SKIP
        (True, 1.0)
    """
    if policy not in _TABLE:
        raise PlanningError(f"unknown offload policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    return _TABLE[policy](build_context(trace, hardware, budgets, timeline=timeline))
