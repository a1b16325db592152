"""``make_plan``: choose a policy by name and turn a trace, a HardwareModel and budgets into a plan.

Deciding is pure: everything here runs without a device. Policies live in
:mod:`offload.policy_lifetime` (the default), :mod:`offload.policy_baselines` and
:mod:`offload.policy_ilp`; they share the
:class:`PlanContext` built here (point times, interval durations and peaks, idle intervals, the
offload tiers and their links), and :func:`finish_plan`, which simulates the decisions and records
the predictions in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from offload.hardware import HardwareModel
from offload.plan import Decision, OffloadPlan, PlanningError
from offload.simulate import simulate

__all__ = ["POLICIES", "Budgets", "PlanContext", "feasible_minimum_bytes", "finish_plan", "make_plan"]

#: Tier kinds from cheapest per byte to dearest: a tensor goes to the cheapest tier that hides it.
_KIND_ORDER = {"nvme": 0, "numa": 1, "host": 2}


@dataclass(frozen=True)
class Budgets:
    """What each tier may hold at once.

    Attributes:
        device_bytes: Device budget in bytes (wins over ``device_fraction``).
        device_fraction: Device budget as a fraction of the unconstrained peak (0 < f <= 1...).
        tier_bytes: ``(tier, bytes)`` for other tiers; a tier not named gets its HardwareModel
            capacity.
    """

    device_bytes: Optional[int] = None
    device_fraction: Optional[float] = None
    tier_bytes: Tuple[Tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        p = []
        if self.device_bytes is not None and self.device_bytes < 0:
            p.append(f"device budget {self.device_bytes} bytes must be >= 0")
        if self.device_fraction is not None and not self.device_fraction > 0:
            p.append(f"device budget fraction {self.device_fraction} must be > 0 (e.g. 0.5 of the unconstrained peak)")
        p.extend(f"tier budget {name}={b} must be >= 0" for name, b in self.tier_bytes if b < 0)
        if p:
            raise PlanningError("; ".join(p))

    def device_budget(self, unconstrained_peak_bytes: int) -> int:
        if self.device_bytes is not None:
            return int(self.device_bytes)
        if self.device_fraction is not None:
            return int(self.device_fraction * unconstrained_peak_bytes)
        return int(unconstrained_peak_bytes)


@dataclass
class PlanContext:
    """Everything a policy needs, derived once from the trace and hardware (read-only for policies).

    Attributes:
        trace: The LifetimeTrace.
        hardware: The HardwareModel (None when no tier exists).
        point_s: ``point_s[p]``: time at which compute reaches point ``p`` (unconstrained).
        duration_s: ``duration_s[p]``: compute of interval ``p`` (0 for the last).
        interval_peak: Unplanned device peak of every interval.
        device_budget: Device budget in bytes.
        tier_budgets: ``{tier: bytes}`` of every offload tier.
        tiers: Offload tiers with a link both ways to the device, cheapest kind first.
        intervals: Idle intervals of non-empty tensors.
    """

    trace: object
    hardware: Optional[HardwareModel]
    point_s: np.ndarray
    duration_s: np.ndarray
    interval_peak: np.ndarray
    device_budget: int
    tier_budgets: Dict[str, int]
    tiers: List[str]
    intervals: list = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return len(self.point_s)

    def round_trip(self, tier: str, nbytes: int) -> Tuple[float, float]:
        """``(out_s, back_s)`` of ``nbytes`` to ``tier`` and back, each link alone."""
        return (self.hardware.link("device", tier).transfer_s(nbytes),
                self.hardware.link(tier, "device").transfer_s(nbytes))


def _context(trace, hardware: Optional[HardwareModel], budgets: Budgets) -> PlanContext:
    from profiling.idle import idle_intervals
    from profiling.timeline import memory_timeline
    from profiling.trace import validate_trace

    if not trace.points:
        raise PlanningError("the trace has no points; profile at least one iteration with `tierflow profile`")
    problems = validate_trace(trace)
    if problems:
        raise PlanningError(f"the trace is inconsistent ({len(problems)} problems, first: {problems[0]}); re-profile")
    compute = np.array([p.compute_s for p in trace.points], dtype=np.float64)
    peak = np.asarray(memory_timeline(trace).interval_peak_bytes, dtype=np.int64)
    tiers: List[str] = []
    tier_budgets: Dict[str, int] = {}
    given = dict(budgets.tier_bytes)
    if hardware is not None:
        names = {t.name for t in hardware.tiers}
        unknown = sorted(set(given) - names)
        if unknown:
            raise PlanningError(f"budget for unknown tier(s) {unknown}; hardware {hardware.name!r} has: "
                                f"{', '.join(sorted(names))}")
        links = {l.name for l in hardware.links}
        for t in hardware.tiers:
            if t.kind != "device" and f"device->{t.name}" in links and f"{t.name}->device" in links:
                tiers.append(t.name)
                tier_budgets[t.name] = int(given.get(t.name, t.capacity_bytes))
    tiers.sort(key=lambda name: (_KIND_ORDER.get(name.split(":")[0], 9), name))
    return PlanContext(trace=trace, hardware=hardware, point_s=np.cumsum(compute),
                       duration_s=np.append(compute[1:], 0.0), interval_peak=peak,
                       device_budget=budgets.device_budget(int(peak.max())), tier_budgets=tier_budgets, tiers=tiers,
                       intervals=[iv for iv in idle_intervals(trace) if iv.size_bytes > 0])


def feasible_minimum_bytes(ctx: PlanContext) -> Tuple[int, int]:
    """The lowest device peak any swap plan can reach, and the interval where it binds.

    A tensor can be off the device at best for its whole idle interval (compute waiting for the
    transfers if need be); what remains in an interval is in use there and must stay.

    Returns:
        ``(bytes, interval)``.
    """
    n = ctx.num_points
    diff = np.zeros(n + 1, dtype=np.int64)
    for iv in ctx.intervals:
        s, b = iv.start_point, iv.end_point
        for a, e in ((s, b),) if s <= b else ((s, n), (0, b)):
            diff[a] += iv.size_bytes
            diff[e] -= iv.size_bytes
    rest = ctx.interval_peak - np.cumsum(diff[:n])
    p = int(np.argmax(rest))
    return int(rest[p]), p


def finish_plan(ctx: PlanContext, policy: str, decisions: Sequence[Decision], notes: Sequence[str] = ()) -> OffloadPlan:
    """Sort the decisions, simulate them, and return the plan with its predictions filled in."""
    ordered = tuple(sorted(decisions, key=lambda d: (d.evict_point, d.key, d.deadline_point)))
    draft = OffloadPlan(policy=policy, hardware=ctx.hardware.name if ctx.hardware else "", num_points=ctx.num_points,
                        device_budget_bytes=ctx.device_budget, tier_budgets=tuple(sorted(ctx.tier_budgets.items())),
                        decisions=ordered,
                        recomputed_blocks=tuple(sorted({d.recompute_block for d in ordered if d.recompute_block})),
                        unconstrained_peak_bytes=int(ctx.interval_peak.max()),
                        unconstrained_step_s=float(sum(p.compute_s for p in ctx.trace.points)), notes=tuple(notes))
    sim = simulate(ctx.trace, draft, ctx.hardware)
    return OffloadPlan(**{**draft.__dict__, "predicted_step_s": sim.step_s, "predicted_peak_bytes": sim.peak_bytes,
                          "predicted_stall_s": sim.stall_s})


def _policies() -> Dict[str, Callable[[PlanContext], OffloadPlan]]:
    from offload.policy_baselines import BASELINES
    from offload.policy_lifetime import plan_lifetime

    def plan_ilp(ctx: PlanContext) -> OffloadPlan:
        from offload.policy_ilp import plan_ilp as solve  # scipy is imported only when asked for

        return solve(ctx)

    return {"lifetime": plan_lifetime, **BASELINES, "ilp": plan_ilp}


#: Policy names accepted by :func:`make_plan` (and ``offload.policy``).
POLICIES = ("lifetime", "none", "all_host", "zero_offload", "zero_infinity", "belady", "ilp")


def make_plan(trace, hardware: Optional[HardwareModel], budgets: Budgets, policy: str = "lifetime") -> OffloadPlan:
    """Plan where every idle tensor waits and when it comes back.

    Args:
        trace: A :class:`~profiling.trace.LifetimeTrace` (one iteration is planned as a cycle).
        hardware: Tiers and links to plan for (None: nothing can move).
        budgets: Device and tier budgets.
        policy: One of :data:`POLICIES`.

    Returns:
        The :class:`~offload.plan.OffloadPlan`, with its simulated predictions.

    Raises:
        PlanningError: unknown policy, inconsistent trace, or (for ``lifetime``) a device budget
            below the feasible minimum, stating that minimum.

    Example:
        >>> plan = make_plan(trace, hw, Budgets(device_fraction=0.5))  # doctest: +SKIP
        >>> plan.fits, round(plan.slowdown, 3)  # doctest: +SKIP
        (True, 1.0)
    """
    table = _policies()
    if policy not in table:
        raise PlanningError(f"unknown offload policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    return table[policy](_context(trace, hardware, budgets))
