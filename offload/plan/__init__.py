"""Deciding, as pure functions: a LifetimeTrace, a HardwareModel and budgets in, an OffloadPlan out.

:func:`make_plan` picks a policy by name from :data:`POLICIES`; every policy reads one shared
:class:`PlanContext` (built once per planning pass) and ends in :func:`finish_plan`, which
simulates the decisions and records the predictions. :func:`simulate` predicts the step time,
stalls and per-tier peaks of any plan; :func:`explain_plan` and :func:`plot_plan` show it.
Nothing here needs a device, a tier or a file other than the one a caller names.
"""

from tierflow.offload.plan._reruns import block_of, forward_spans, parse_block, saved_within, with_reruns
from tierflow.offload.plan.context import Budgets, PlanContext, feasible_minimum_bytes, finish_plan
from tierflow.offload.plan.explain import explain_plan, plot_plan
from tierflow.offload.plan.planner import POLICIES, make_plan
from tierflow.offload.plan.simulate import Simulation, simulate
from tierflow.offload.plan.types import (
    Action,
    Decision,
    OffloadPlan,
    PlanError,
    PlanFileError,
    PlanningError,
    absent_intervals,
    interval_range,
    plan_memory,
    validate_plan,
)

__all__ = [
    "POLICIES",
    "Action",
    "Budgets",
    "Decision",
    "OffloadPlan",
    "PlanContext",
    "PlanError",
    "PlanFileError",
    "PlanningError",
    "Simulation",
    "absent_intervals",
    "block_of",
    "explain_plan",
    "feasible_minimum_bytes",
    "finish_plan",
    "forward_spans",
    "interval_range",
    "make_plan",
    "parse_block",
    "saved_within",
    "plan_memory",
    "plot_plan",
    "simulate",
    "validate_plan",
    "with_reruns",
]
