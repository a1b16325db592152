"""A discrete-event model of one iteration under an :class:`~tierflow.offload.plan.types.OffloadPlan`.

The compute stream walks the trace's points in order and spends each point's measured
``compute_s``. Every link (``src->dst`` of the HardwareModel) is a channel: a transfer of ``n``
bytes issued at ``t`` starts once fewer than ``best_concurrency`` transfers are in flight, pays
``latency_s`` (latencies of concurrent transfers overlap), then streams its bytes at
``bandwidth_bytes_per_s``; bytes of different transfers do not overlap (the link's bandwidth is
the aggregate one). Compute waits (a *stall*, charged to the point where it waits):

* at a decision's ``free_point`` until its offload has finished (the plan promised the memory
  would be free from there on, so the predicted peak is the plan's own memory timeline);
* at a decision's ``deadline_point`` until its prefetch has arrived;
* where a recomputed block re-runs, for the block's compute (once per block): at the first
  unpack of anything saved inside it in backward, or its first recompute deadline if earlier
  (Note [recompute reads parameters early] in :mod:`tierflow.offload.plan._reruns`; what the
  re-run reads is then a use in the plan, so the plan's memory timeline already holds it).

Steady state (Note [steady state]): transfers still running when compute ends overlap the next
iteration, so the iteration is simulated twice with the links carried over and the second one is
reported. With no decisions the step time is the sum of the measured compute, added in point
order, exactly.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

from tierflow.offload.core.hardware import HardwareModel, LinkModel
from tierflow.offload.plan._reruns import parse_block, rerun_points
from tierflow.offload.plan.types import Action, Decision, OffloadPlan, PlanningError, plan_memory
from tierflow.profiling.timeline import MemoryTimeline, memory_timeline

__all__ = ["Simulation", "simulate"]


@dataclass(frozen=True)
class Simulation:
    """What one iteration under a plan is predicted to do.

    Attributes:
        step_s: Predicted iteration time (compute + stalls, or later if a transfer ends last).
        compute_s: Sum of the trace's measured compute (the unconstrained step time).
        stall_s: Total time compute waited.
        stalls: ``(point, seconds)`` for every point where compute waited, in point order.
        point_times_s: Time at which compute reaches each point.
        peak_bytes: ``(tier, bytes)`` highest occupancy of each tier, device first.
        link_bytes: ``(link, bytes)`` moved over each link used, sorted by link name.
        recompute_s: Compute spent re-running recomputed blocks.
    """

    step_s: float
    compute_s: float
    stall_s: float
    stalls: Tuple[Tuple[int, float], ...]
    point_times_s: Tuple[float, ...]
    peak_bytes: Tuple[Tuple[str, int], ...]
    link_bytes: Tuple[Tuple[str, int], ...]
    recompute_s: float = 0.0

    @property
    def slowdown(self) -> float:
        return self.step_s / self.compute_s if self.compute_s > 0 else 1.0


class _Channel:
    """One link direction: FIFO bytes, ``best_concurrency`` transfers in flight, overlapping latencies."""

    def __init__(self, link: LinkModel) -> None:
        self.link = link
        self.pipe_free = 0.0
        self.in_flight: Deque[float] = deque()
        self.bytes = 0

    def transfer(self, issue_s: float, nbytes: int) -> float:
        """Finish time of a transfer of ``nbytes`` issued at ``issue_s``."""
        start = issue_s
        if len(self.in_flight) >= self.link.best_concurrency:
            start = max(start, self.in_flight.popleft())
        data_start = max(start + self.link.latency_s, self.pipe_free)
        finish = data_start + nbytes / self.link.bandwidth_bytes_per_s
        self.pipe_free = finish
        self.in_flight.append(finish)
        self.bytes += nbytes
        return finish

    def shift(self, by_s: float) -> None:
        """Move the clock origin to ``by_s`` (the start of the next iteration)."""
        self.pipe_free -= by_s
        self.in_flight = deque(f - by_s for f in self.in_flight)


def simulate(trace, plan: OffloadPlan, hardware: Optional[HardwareModel] = None, *,
             timeline: Optional[MemoryTimeline] = None) -> Simulation:
    """Predict step time, stalls, per-tier peaks and link traffic of ``plan`` on ``hardware``.

    Args:
        trace: The :class:`~tierflow.profiling.trace.LifetimeTrace` the plan was made from.
        plan: The plan (an empty plan simulates the unconstrained iteration).
        hardware: Link models; required when the plan swaps anything.
        timeline: The trace's memory timeline when the caller has it already (one per planning pass).

    Returns:
        The :class:`Simulation`.

    Raises:
        PlanningError: the plan is for another trace, or swaps over a link the hardware lacks.

    Example:
        >>> sim = simulate(trace, OffloadPlan("none", "", len(trace.points), 1 << 40))  # doctest: +SKIP
        >>> sim.step_s == sum(p.compute_s for p in trace.points)  # doctest: +SKIP
        True
    """
    n = len(trace.points)
    if plan.num_points != n:
        raise PlanningError(f"plan is for a trace of {plan.num_points} points; this trace has {n}: re-plan it")
    channels: Dict[str, _Channel] = {}

    def channel(src: str, dst: str) -> _Channel:
        name = f"{src}->{dst}"
        if name not in channels:
            if hardware is None:
                raise PlanningError("the plan moves tensors; pass the HardwareModel to simulate it")
            try:
                channels[name] = _Channel(hardware.link(src, dst))
            except KeyError as exc:
                raise PlanningError(str(exc).strip("'\"")) from None
        return channels[name]

    evicts: Dict[int, List[int]] = defaultdict(list)
    frees: Dict[int, List[int]] = defaultdict(list)
    prefetches: Dict[int, List[int]] = defaultdict(list)
    deadlines: Dict[int, List[int]] = defaultdict(list)
    block_due: Dict[str, Tuple[int, float]] = {}
    decisions: List[Decision] = list(plan.decisions)
    # A block re-runs once, at the first unpack of anything saved inside it (Note [recompute reads
    # parameters early]); where the trace shows none, before the first of its tensors is needed.
    rerun_at = {f"{path}[{call}]": p for (path, call), p in
                rerun_points(trace, [parse_block(b) for b in plan.recomputed_blocks]).items()}
    for i, d in enumerate(decisions):
        if d.action is Action.RECOMPUTE:
            due, cost = block_due.get(d.recompute_block, (rerun_at.get(d.recompute_block, n), 0.0))
            block_due[d.recompute_block] = (min(due, d.deadline_point), max(cost, d.recompute_s))
            continue
        evicts[d.evict_point].append(i)
        prefetches[d.prefetch_point].append(i)
        frees[d.free_point].append(i)
        deadlines[d.deadline_point].append(i)
    # Transfers issued at the same point go earliest-needed first: offloads by how soon the plan
    # frees their memory, prefetches by how soon their tensor is used.
    for table, attr in ((evicts, "free_point"), (prefetches, "deadline_point")):
        for p, ids in table.items():
            ids.sort(key=lambda i: ((getattr(decisions[i], attr) - p) % n, i))
    recompute_at: Dict[int, float] = defaultdict(float)
    for due, cost in block_due.values():
        recompute_at[due] += cost

    # Note [steady state]: a wrapped decision's free or deadline that comes before its evict or
    # prefetch in point order waits on the *previous* iteration's transfer, and transfers still
    # running when compute ends overlap the next iteration. So the iteration runs twice with the
    # links carried over (clock shifted to 0) and the second one is reported.
    prev_out: Dict[int, float] = {}
    prev_back: Dict[int, float] = {}
    for _ in range(2 if decisions else 1):
        out_done: Dict[int, float] = {}
        back_done: Dict[int, float] = {}
        times: List[float] = []
        stalls: List[Tuple[int, float]] = []
        for c in channels.values():
            c.bytes = 0
        t = 0.0
        for p, point in enumerate(trace.points):
            t += point.compute_s
            # Transfers of a point are issued when compute reaches it; then compute waits for
            # the memory the plan frees here and the tensors it uses here.
            for i in evicts.get(p, ()):
                d = decisions[i]
                out_done[i] = channel("device", d.tier).transfer(t, d.size_bytes)
            for i in prefetches.get(p, ()):
                d = decisions[i]
                # Bytes come back only once they have left (a wrapped prefetch before its evict
                # reads what the previous iteration wrote).
                src = prev_out if d.prefetch_point < d.evict_point else out_done
                back_done[i] = channel(d.tier, "device").transfer(max(t, src.get(i, 0.0)), d.size_bytes)
            ready = t
            for i in frees.get(p, ()):
                d = decisions[i]
                ready = max(ready, (prev_out if d.free_point < d.evict_point else out_done).get(i, 0.0))
            for i in deadlines.get(p, ()):
                d = decisions[i]
                ready = max(ready, (prev_back if d.deadline_point < d.prefetch_point else back_done).get(i, 0.0))
            if ready > t:
                stalls.append((p, ready - t))
                t = ready
            t += recompute_at.get(p, 0.0)  # re-running a block is compute, not a stall
            times.append(t)
        for c in channels.values():
            c.shift(t)
        prev_out = {i: v - t for i, v in out_done.items()}
        prev_back = {i: v - t for i, v in back_done.items()}
    compute = sum(pt.compute_s for pt in trace.points)
    tiers = sorted({d.tier for d in decisions if d.action is Action.SWAP} | {name for name, _ in plan.tier_budgets})
    mem = plan_memory((timeline or memory_timeline(trace)).interval_peak_bytes, decisions, tiers)
    peaks = tuple((tier, int(max(series)) if series else 0) for tier, series in mem.items())
    return Simulation(step_s=t, compute_s=compute, stall_s=sum(s for _, s in stalls),
                      stalls=tuple(stalls), point_times_s=tuple(times), peak_bytes=peaks,
                      link_bytes=tuple(sorted((name, c.bytes) for name, c in channels.items())),
                      recompute_s=sum(cost for _, cost in block_due.values()))
