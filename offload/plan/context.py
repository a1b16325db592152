"""The planning context every policy reads, and the two steps every policy shares.

:func:`build_context` derives, once per planning pass, what a policy needs from a trace, a
HardwareModel and budgets: point times, interval durations, the unplanned memory timeline and its
peaks, idle intervals and the offload tiers cheapest first. :func:`finish_plan` sorts a policy's
decisions, simulates them against the same timeline, and returns the plan with its predictions.
Policies import this module; the registry in :mod:`tierflow.offload.plan.planner` imports the
policies (the same shape as DCP's ``planner_helpers`` / ``default_planner``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import numpy as np

from tierflow.offload.core.hardware import HardwareModel
from tierflow.offload.core.names import kind_of
from tierflow.offload.plan._reruns import block_of, forward_spans, parse_block, rerun_points, with_reruns
from tierflow.offload.plan.simulate import simulate
from tierflow.offload.plan.types import Action, Decision, OffloadPlan, PlanningError
from tierflow.profiling.idle import idle_intervals
from tierflow.profiling.timeline import MemoryTimeline, memory_timeline
from tierflow.profiling.trace import validate_trace

__all__ = ["Budgets", "PlanContext", "RecomputeRegions", "block_of", "build_context", "feasible_minimum_bytes",
           "finish_plan", "plan_with_reruns", "recompute_blocks"]

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
        timeline: The unplanned memory timeline (shared with the simulator: computed once).
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
    timeline: Optional[MemoryTimeline] = None

    @property
    def num_points(self) -> int:
        return len(self.point_s)

    def round_trip(self, tier: str, nbytes: int) -> Tuple[float, float]:
        """``(out_s, back_s)`` of ``nbytes`` to ``tier`` and back, each link alone."""
        return (self.hardware.link("device", tier).transfer_s(nbytes),
                self.hardware.link(tier, "device").transfer_s(nbytes))


def build_context(trace, hardware: Optional[HardwareModel], budgets: Budgets, *,
                  timeline: Optional[MemoryTimeline] = None) -> PlanContext:
    """Derive the :class:`PlanContext` of one planning pass (the memory timeline is computed once, here,
    unless the caller hands in the one it has).

    Raises:
        PlanningError: an empty or inconsistent trace, or a budget for a tier the hardware lacks.
    """
    if not trace.points:
        raise PlanningError("the trace has no points; profile at least one iteration with `tierflow profile`")
    problems = validate_trace(trace)
    if problems:
        raise PlanningError(f"the trace is inconsistent ({len(problems)} problems, first: {problems[0]}); re-profile")
    compute = np.array([p.compute_s for p in trace.points], dtype=np.float64)
    timeline = timeline if timeline is not None else memory_timeline(trace)
    peak = np.asarray(timeline.interval_peak_bytes, dtype=np.int64)
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
    tiers.sort(key=lambda name: (_KIND_ORDER.get(kind_of(name), 9), name))
    return PlanContext(trace=trace, hardware=hardware, point_s=np.cumsum(compute),
                       duration_s=np.append(compute[1:], 0.0), interval_peak=peak,
                       device_budget=budgets.device_budget(int(peak.max())), tier_budgets=tier_budgets, tiers=tiers,
                       timeline=timeline,
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
    decisions = [*decisions, *_rest_of_reruns(ctx, decisions)]
    ordered = tuple(sorted(decisions, key=lambda d: (d.evict_point, d.key, d.deadline_point)))
    draft = OffloadPlan(policy=policy, hardware=ctx.hardware.name if ctx.hardware else "", num_points=ctx.num_points,
                        device_budget_bytes=ctx.device_budget, tier_budgets=tuple(sorted(ctx.tier_budgets.items())),
                        decisions=ordered,
                        recomputed_blocks=tuple(sorted({d.recompute_block for d in ordered if d.recompute_block})),
                        unconstrained_peak_bytes=int(ctx.interval_peak.max()),
                        unconstrained_step_s=float(sum(p.compute_s for p in ctx.trace.points)), notes=tuple(notes))
    sim = simulate(ctx.trace, draft, ctx.hardware, timeline=ctx.timeline)
    return OffloadPlan(**{**draft.__dict__, "predicted_step_s": sim.step_s, "predicted_peak_bytes": sim.peak_bytes,
                          "predicted_stall_s": sim.stall_s})


def _rest_of_reruns(ctx: PlanContext, decisions: Sequence[Decision]) -> List[Decision]:
    """Recompute decisions for the activations a re-run block drops that no decision names.

    Note [a re-run re-makes the whole block], the other way round: a block run under activation
    checkpointing keeps none of what its forward made and saved, whether or not the policy needed
    that tensor away; all of it is gone until the block re-runs. A policy stops deciding once the
    peak fits, so the plan said less was away than was (a GPT MLP re-run for one tensor dropped
    290 KiB more; the runtime's account read 4% above the memory). Each such gap, from the
    activation's last forward use to the block's re-run point (a use of it in a trace planned
    with re-runs: :func:`~tierflow.offload.plan._reruns.with_reruns`), gets a recompute decision.
    """
    blocks = {d.recompute_block for d in decisions if d.action is Action.RECOMPUTE}
    if not blocks:
        return []
    trace = ctx.trace
    parsed = {parse_block(b): b for b in blocks}
    spans, rerun_at = forward_spans(trace), rerun_points(trace, parsed)
    named = {(d.record, d.evict_point) for d in decisions}
    out: List[Decision] = []
    for iv in ctx.intervals:
        if iv.category.value != "activation" or iv.wraps or (iv.record, iv.start_point) in named:
            continue
        saver, created = spans.get(block_of(iv.key)), trace.tensors[iv.record].created
        if saver is None or created is None:
            continue
        for blk, name in parsed.items():
            a, b = spans[blk]
            if a <= saver[0] and saver[1] <= b and a <= created < b and iv.end_point == rerun_at.get(blk) \
                    and created < iv.start_point < iv.end_point:
                out.append(Decision(key=iv.key, record=iv.record, category=iv.category.value, size_bytes=iv.size_bytes,
                                    action=Action.RECOMPUTE, tier="", evict_point=iv.start_point,
                                    free_point=iv.start_point, prefetch_point=iv.end_point,
                                    deadline_point=iv.end_point, recompute_block=name,
                                    recompute_s=0.0, reason=f"made inside {name}, which is re-run: checkpointed, "
                                                            "it keeps none of what it made"))
                break
    return out


def plan_with_reruns(ctx: PlanContext,
                     policy: Callable[[PlanContext, Optional[FrozenSet[Tuple[str, int]]]], OffloadPlan]) -> OffloadPlan:
    """Run ``policy`` until the blocks it re-runs are the ones whose re-runs it planned around.

    Note [recompute reads parameters early] (in :mod:`tierflow.offload.plan._reruns`): re-running
    block ``B`` reads, at its re-run point, what ``B``'s forward read; which blocks re-run is the
    policy's own choice. So the first pass plans on the trace as recorded; when it re-runs blocks
    ``C``, the next pass plans on the trace with ``C``'s re-run reads as uses and may re-run only
    blocks of ``C``. Passes repeat while the chosen blocks shrink (at most ``len(C) + 1`` more; one
    more in practice), and the last one is exact about what it re-runs.

    Args:
        ctx: The planning context of the recorded trace.
        policy: ``policy(ctx, only)``: a plan re-running only blocks of ``only`` (None: any).

    Returns:
        A plan whose recomputed blocks' reads are on the device where they re-run.

    Raises:
        PlanningError: from ``policy`` on the recorded trace, or without re-runs.
    """
    plan = policy(ctx, None)
    planned_for: FrozenSet[Tuple[str, int]] = frozenset()
    while (chosen := frozenset(parse_block(b) for b in plan.recomputed_blocks)) != planned_for:
        planned_for = chosen
        trace = with_reruns(ctx.trace, chosen)
        timeline = memory_timeline(trace)  # the re-runs hold more (Note [a re-run re-makes the whole block])
        try:
            plan = policy(replace(ctx, trace=trace, intervals=[iv for iv in idle_intervals(trace) if iv.size_bytes > 0],
                                  timeline=timeline,
                                  interval_peak=np.asarray(timeline.interval_peak_bytes, dtype=np.int64)), chosen)
        except PlanningError:
            return policy(ctx, frozenset())  # the reads do not fit beside the re-runs: swaps alone
    return plan


def recompute_blocks(trace) -> Dict[Tuple[str, int], float]:
    """``(module path, call index) -> forward compute seconds`` of every module call in the trace."""
    t = np.cumsum([p.compute_s for p in trace.points])
    return {blk: float(t[b] - t[a]) for blk, (a, b) in forward_spans(trace).items()}


class RecomputeRegions:
    """Which block may re-create an activation, and the blocks a policy has chosen to recompute.

    Note [recompute regions]: the runtime recomputes block ``B`` by running its forward under
    activation checkpointing, which keeps ``B``'s inputs and saves nothing else. So:

    * only an activation both created and saved during ``B``'s forward comes back by re-running
      ``B``; one that existed before (an input of ``B``, saved by an operation inside it) stays on
      the device, held by the checkpoint. A policy recomputes an activation through the innermost
      block that created and saved it (not necessarily the module its key names: a Linear saves
      its input, made by the module before it).
    * nothing saved inside ``B`` reaches the runtime's saved-tensor hooks, so no swap may name an
      activation saved there, and no second recomputed block may nest in ``B`` or around it: the
      runtime does not re-enter a block's hooks while re-running another, so an outer block's
      re-run would save the inner block's tensors too, and ``torch.utils.checkpoint`` raises
      ``CheckpointError`` (or, were their shapes to agree, hands back the wrong tensors).

    Once ``B`` is chosen, every decision on an activation saved inside ``B`` recomputes through ``B``
    (:meth:`chosen_for`: that costs nothing more) or is not made.
    """

    def __init__(self, trace, enabled: bool = True, only: Optional[FrozenSet[Tuple[str, int]]] = None) -> None:
        self.trace = trace
        self.enabled = enabled  # False: no activation may be recomputed
        self.only = only  # the blocks that may be re-run (None: any)
        self.spans = forward_spans(trace)
        self.cost_s = recompute_blocks(trace)
        # The call each call's forward runs inside (spans nest: a stack over them sorted by start).
        self.parent: Dict[Tuple[str, int], Optional[Tuple[str, int]]] = {}
        stack: List[Tuple[str, int]] = []
        for blk in sorted(self.spans, key=lambda k: (self.spans[k][0], -self.spans[k][1])):
            while stack and self.spans[stack[-1]][1] <= self.spans[blk][0]:
                stack.pop()
            self.parent[blk] = stack[-1] if stack else None
            stack.append(blk)
        # Note [a re-run re-makes the whole block]: from its re-run point on, a block's activations
        # are on the device again; only a gap that ends by then is recreated by re-running it.
        self.rerun_at = rerun_points(trace, only) if only else {}
        self.chosen: Dict[Tuple[str, int], Tuple[int, int]] = {}
        # Activations decided on so far, by the point where the module that saved them starts: a
        # span starting inside another lies inside it. Values: the blocks they recompute through
        # (None: a swap).
        self._decided: Dict[int, Set[Optional[Tuple[str, int]]]] = {}
        self._decided_starts: List[int] = []

    def origin(self, iv) -> Tuple[Optional[Tuple[int, int]], Optional[int]]:
        """``(span of the module that saved it, point it was created at)`` of an activation interval."""
        if iv.category.value != "activation":
            return None, None
        return self.spans.get(block_of(iv.key)), self.trace.tensors[iv.record].created

    def block_for(self, iv) -> Optional[Tuple[str, int]]:
        """The innermost block whose forward created and saved ``iv``'s activation, or None."""
        saver, created = self.origin(iv)
        blk = block_of(iv.key) if self.enabled and saver is not None and created is not None else None
        while blk is not None and not self.spans[blk][0] <= created < self.spans[blk][1]:
            blk = self.parent[blk]
        if blk is None or (self.only is not None and blk not in self.only):
            return None
        return blk if self._before_rerun(iv, blk) else None

    def _before_rerun(self, iv, blk: Tuple[str, int]) -> bool:
        """Whether ``iv``'s gap ends by ``blk``'s re-run (a gap after it holds the re-made tensor)."""
        at = self.rerun_at.get(blk)
        return at is None or iv.start_point < at

    def saved_inside(self, iv, blocks) -> bool:
        """Whether ``iv``'s activation was saved during the forward of one of ``blocks``."""
        saver, _ = self.origin(iv)
        blk = block_of(iv.key) if saver is not None else None
        while blk is not None and blk not in blocks:
            blk = self.parent[blk]
        return blk is not None

    def chosen_for(self, iv) -> Optional[Tuple[str, int]]:
        """A chosen block that already re-creates ``iv``'s activation, or None."""
        saver, created = self.origin(iv)
        if saver is None or created is None:
            return None
        return next((blk for blk, (a, b) in self.chosen.items()
                     if a <= saver[0] and saver[1] <= b and a <= created < b and self._before_rerun(iv, blk)), None)

    def allows(self, iv, block: Optional[Tuple[str, int]] = None) -> bool:
        """Whether a decision on ``iv`` (recompute through ``block``; a swap when None) keeps clear
        of the chosen blocks and of the decisions made so far."""
        saver, _ = self.origin(iv)
        if saver is not None and any(blk != block and a <= saver[0] and saver[1] <= b
                                     for blk, (a, b) in self.chosen.items()):
            return False  # saved inside a chosen block: the runtime never sees it saved
        if block is None:
            return True
        a, b = self.spans[block]
        if any(blk != block and (a <= c < b or c <= a < d) for blk, (c, d) in self.chosen.items()):
            return False  # nested in a chosen block or around one
        starts = self._decided_starts
        inside = starts[bisect.bisect_left(starts, a):bisect.bisect_left(starts, b)]
        return all(self._decided[c] <= {block} for c in inside)

    def add(self, iv, block: Optional[Tuple[str, int]] = None) -> None:
        """Record a decision on ``iv`` (call after :meth:`allows` said yes)."""
        saver, _ = self.origin(iv)
        if block is not None:
            self.chosen[block] = self.spans[block]
        if saver is not None:
            if saver[0] not in self._decided:
                bisect.insort(self._decided_starts, saver[0])
            self._decided.setdefault(saver[0], set()).add(block)
