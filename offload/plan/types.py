"""The ``OffloadPlan`` contract: which tensor leaves the device, where to, and when it comes back.

A plan is pure data (frozen dataclasses and enums): one :class:`Decision` per idle interval that
a policy acted on, plus the budgets it was made for and what the simulator predicted for it. It
round-trips through JSON, diffs line by line, and every decision carries its reason.

Note [decision points]: points follow Note [points and intervals] in :mod:`tierflow.profiling.trace`;
interval ``p`` is the compute between point ``p`` and ``p + 1``. A decision on an idle interval
``[evict_point, deadline_point)`` says:

* ``evict_point``: the transfer off the device is issued when compute reaches this point;
* ``free_point``: from interval ``free_point`` on the device no longer holds the tensor (the
  runtime waits at that point for the offload to finish if it has not);
* ``prefetch_point``: the transfer back is issued (and device memory re-reserved) here;
* ``deadline_point``: the next use; compute waits here until the tensor is back.

The tensor is absent from the device during intervals ``free_point .. prefetch_point - 1`` and
held by the tier during ``evict_point .. deadline_point - 1``. Ranges wrap around the iteration
end when ``wraps`` is true (parameters and optimizer states idle across the step boundary).
A ``recompute`` decision frees at ``evict_point`` and re-creates the tensor by re-running
``recompute_block`` right before ``deadline_point``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from tierflow.offload.plan._reruns import parse_block, with_reruns
from tierflow.profiling.timeline import memory_timeline

__all__ = ["Action", "Decision", "OffloadPlan", "PlanError", "PlanFileError", "PlanningError", "absent_intervals",
           "interval_range", "plan_memory", "validate_plan"]

PLAN_SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan violates its trace, its hardware or its budgets; the message lists every violation."""


class PlanningError(ValueError):
    """A policy cannot make a plan (budget below the feasible minimum, unknown policy, bad input)."""


class PlanFileError(ValueError):
    """A plan JSON file is missing or damaged."""


class Action(str, Enum):
    """What happens to a tensor during its idle interval."""

    SWAP = "swap"  # copy to a tier, free device memory, copy back before the next use
    RECOMPUTE = "recompute"  # free, re-run the block that produced it before the next use


@dataclass(frozen=True)
class Decision:
    """One idle interval of one tensor that the plan acts on (see Note [decision points]).

    Attributes:
        key: Stable tensor key.
        record: Index of the tensor in ``trace.tensors``.
        category: Its category value (``activation``, ``optimizer_state``...).
        size_bytes: Bytes moved (or freed for recompute).
        action: Swap or recompute.
        tier: Destination tier name for a swap (``host``, ``numa:2``, ``nvme:0``); '' for recompute.
        evict_point: Point where it leaves.
        free_point: First interval without it on the device.
        prefetch_point: Point where it starts coming back.
        deadline_point: Point of its next use.
        wraps: The interval crosses the end of the iteration.
        recompute_block: ``module[call]`` re-run for a recompute ('' for a swap).
        recompute_s: Compute (seconds) of that re-run.
        reason: Why: idle window vs transfer time, tier chosen and why.
    """

    key: str
    record: int
    category: str
    size_bytes: int
    action: Action
    tier: str
    evict_point: int
    free_point: int
    prefetch_point: int
    deadline_point: int
    wraps: bool = False
    recompute_block: str = ""
    recompute_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class OffloadPlan:
    """A policy's decisions for one traced iteration, with the budgets and predictions.

    Attributes:
        policy: Name of the policy that made it.
        hardware: Name of the HardwareModel it was made for.
        num_points: Points of the trace it belongs to (a plan only applies to its own trace).
        device_budget_bytes: Device budget it was made for.
        tier_budgets: ``(tier, bytes)`` for every other tier.
        decisions: Ordered by evict point, then key.
        recomputed_blocks: Distinct ``module[call]`` blocks that are re-run.
        unconstrained_peak_bytes: Device peak without any offloading.
        unconstrained_step_s: Step time without any offloading (sum of measured compute).
        predicted_step_s: Simulated step time of this plan.
        predicted_peak_bytes: ``(tier, bytes)`` simulated peak per tier (device first).
        predicted_stall_s: Total simulated stall.
        notes: Policy-level remarks (e.g. the budget already fits, nothing to do).
    """

    policy: str
    hardware: str
    num_points: int
    device_budget_bytes: int
    tier_budgets: Tuple[Tuple[str, int], ...] = ()
    decisions: Tuple[Decision, ...] = ()
    recomputed_blocks: Tuple[str, ...] = ()
    unconstrained_peak_bytes: int = 0
    unconstrained_step_s: float = 0.0
    predicted_step_s: float = 0.0
    predicted_peak_bytes: Tuple[Tuple[str, int], ...] = ()
    predicted_stall_s: float = 0.0
    notes: Tuple[str, ...] = field(default=())

    @property
    def predicted_device_peak_bytes(self) -> int:
        return dict(self.predicted_peak_bytes).get("device", self.unconstrained_peak_bytes)

    @property
    def fits(self) -> bool:
        """True when the predicted device peak is within the device budget."""
        return self.predicted_device_peak_bytes <= self.device_budget_bytes

    @property
    def slowdown(self) -> float:
        """Predicted step time over the unconstrained one (1.0 = no slowdown)."""
        return self.predicted_step_s / self.unconstrained_step_s if self.unconstrained_step_s > 0 else 1.0

    # --- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        data = json.loads(json.dumps(asdict(self)))  # enums are str subclasses; tuples become lists
        data["schema_version"] = PLAN_SCHEMA_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OffloadPlan":
        """Inverse of :meth:`to_dict`.

        Raises:
            PlanFileError: a key is missing or unknown, or the schema version differs.
        """
        data = dict(data)
        version = data.pop("schema_version", PLAN_SCHEMA_VERSION)
        if version != PLAN_SCHEMA_VERSION:
            raise PlanFileError(f"plan schema_version={version} is not supported (expected {PLAN_SCHEMA_VERSION}); "
                                f"re-run `tierflow plan`")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanFileError(f"plan has unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        try:
            decisions = tuple(Decision(**{**d, "action": Action(d["action"])}) for d in data.get("decisions", ()))
            pairs = {k: tuple((str(a), int(b)) for a, b in data.get(k, ())) for k in ("tier_budgets", "predicted_peak_bytes")}
            return cls(**{**data, **pairs, "decisions": decisions,
                          "recomputed_blocks": tuple(data.get("recomputed_blocks", ())),
                          "notes": tuple(data.get("notes", ()))})
        except (TypeError, ValueError, KeyError) as exc:
            raise PlanFileError(f"malformed plan: {exc}; re-run `tierflow plan`") from None

    @classmethod
    def from_json(cls, text: str) -> "OffloadPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanFileError(f"plan is not JSON ({exc}); re-run `tierflow plan`") from None

    def save(self, path: Union[str, Path]) -> Path:
        """Write the JSON owner-only (0600), atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "OffloadPlan":
        path = Path(path)
        if not path.is_file():
            raise PlanFileError(f"plan file {path} does not exist; write one with `tierflow plan`")
        return cls.from_json(path.read_text())


def interval_range(start: int, stop: int, num_points: int) -> List[Tuple[int, int]]:
    """Half-open slices ``[start, stop)`` over ``num_points`` intervals, split where it wraps."""
    if start <= stop:
        return [(start, stop)] if start < stop else []
    return [(start, num_points), (0, stop)]


def absent_intervals(d: Decision, num_points: int) -> List[Tuple[int, int]]:
    """Slices of intervals during which ``d``'s tensor is not on the device."""
    if d.action is Action.RECOMPUTE:
        return interval_range(d.evict_point, d.deadline_point, num_points)
    if not d.wraps and d.free_point >= d.prefetch_point:
        return []  # came back before it was ever released: saves nothing
    return interval_range(d.free_point, d.prefetch_point, num_points)


def plan_memory(interval_peak: Sequence[int], decisions: Sequence[Decision],
                tiers: Sequence[str]) -> Dict[str, List[int]]:
    """Per-interval bytes of every tier under ``decisions``.

    Args:
        interval_peak: Unplanned device peak of every interval (``MemoryTimeline.interval_peak_bytes``).
        decisions: The plan's decisions.
        tiers: Tier names to report besides ``device``.

    Returns:
        ``{tier: [bytes per interval]}`` with ``device`` first.
    """

    n = len(interval_peak)
    diff = {t: np.zeros(n + 1, dtype=np.int64) for t in ["device", *tiers]}
    for d in decisions:
        for a, b in absent_intervals(d, n):
            diff["device"][a] -= d.size_bytes
            diff["device"][b] -= -d.size_bytes
        if d.action is Action.SWAP and d.tier in diff:
            for a, b in interval_range(d.evict_point, d.deadline_point, n):
                diff[d.tier][a] += d.size_bytes
                diff[d.tier][b] -= d.size_bytes
    out = {t: np.cumsum(v[:n]).tolist() for t, v in diff.items()}
    out["device"] = (np.asarray(interval_peak, dtype=np.int64) + np.asarray(out["device"], dtype=np.int64)).tolist()
    return out


def _accesses(trace: Any, record: int) -> List[int]:
    # Same rule as tierflow.profiling.idle: a storage allocated by an operation was written in that interval.
    r = trace.tensors[record]
    pts = set(r.uses)
    if r.created is not None and r.created_tick != trace.points[r.created].tick:
        pts.add(r.created)
    return sorted(pts)


def _check_decision(i: int, d: Decision, trace: Any, hardware: Any, p: List[str]) -> None:
    n = len(trace.points)
    where = f"decision {i} ({d.key!r})"
    if not 0 <= d.record < len(trace.tensors):
        p.append(f"{where}: record {d.record} outside 0..{len(trace.tensors) - 1}")
        return
    r = trace.tensors[d.record]
    if r.key != d.key or r.size_bytes != d.size_bytes:
        p.append(f"{where}: record {d.record} is {r.key!r} of {r.size_bytes} bytes, not {d.key!r} of {d.size_bytes}")
    pts = (d.evict_point, d.free_point, d.prefetch_point, d.deadline_point)
    if not all(0 <= x < n for x in pts):
        p.append(f"{where}: points {pts} outside 0..{n - 1}")
        return
    if d.action is Action.SWAP:
        if hardware is not None:
            names = [t.name for t in hardware.tiers]
            if d.tier == "device" or d.tier not in names:
                p.append(f"{where}: tier {d.tier!r} is not an offload tier of {hardware.name!r} ({', '.join(names)})")
            else:
                for src, dst in (("device", d.tier), (d.tier, "device")):
                    try:
                        hardware.link(src, dst)
                    except KeyError:
                        p.append(f"{where}: hardware {hardware.name!r} has no link {src}->{dst}")
    elif d.category != "activation" or not d.recompute_block or d.recompute_s < 0:
        p.append(f"{where}: recompute needs an activation, a recompute_block and recompute_s >= 0")
    if d.wraps != (d.evict_point > d.deadline_point):
        p.append(f"{where}: wraps={d.wraps} but evict_point {d.evict_point} vs deadline_point {d.deadline_point}")
        return
    if d.wraps and (r.created is not None or r.freed is not None):
        p.append(f"{where}: only tensors alive across iterations may wrap; this one is created or freed in the trace")
    held = interval_range(d.evict_point, d.deadline_point, n)

    def inside(x: int) -> bool:  # a point of the held window, its end (the deadline) included
        return any(a <= x <= b for a, b in held) or x == d.deadline_point

    if d.action is Action.SWAP and not (inside(d.free_point) and inside(d.prefetch_point)):
        p.append(f"{where}: free_point {d.free_point} and prefetch_point {d.prefetch_point} must lie between "
                 f"evict_point {d.evict_point} and deadline_point {d.deadline_point}: offloaded tensor not back "
                 f"before its next use and not marked recompute")
    acc = _accesses(trace, d.record)
    early = [u for u in acc if any(a <= u < b for a, b in held)]
    if early:
        p.append(f"{where}: used at point {early[0]} before arrival (away from evict_point {d.evict_point} to "
                 f"deadline_point {d.deadline_point})")
    # A tensor the iteration never touches (a branch this batch skipped) is away all of it and
    # due back at its end (profiling.idle gives it that one interval).
    if d.deadline_point not in acc and (acc or d.deadline_point != n - 1):
        p.append(f"{where}: deadline_point {d.deadline_point} is not a use of the tensor (uses: {acc[:8]})")


def validate_plan(plan: OffloadPlan, trace: Any, hardware: Any = None, *, timeline: Any = None) -> List[str]:
    """Every violation of ``plan`` against its trace, hardware and budgets.

    Args:
        plan: The plan.
        trace: The :class:`~tierflow.profiling.trace.LifetimeTrace` it was made from.
        hardware: The :class:`~tierflow.offload.core.hardware.HardwareModel` (tiers and links are checked when given).
        timeline: The trace's memory timeline, when the caller has it (one per planning pass).

    Returns:
        One line per problem (empty when the plan is valid): use before arrival (a recomputed
        block's re-run counts as a use of what its forward read), a budget exceeded (at the worst
        interval of each tier), an offloaded tensor not back before its next use, overlapping
        decisions, unknown tiers or links.
    """
    p: List[str] = []
    n = len(trace.points)
    if plan.num_points != n:
        return [f"plan is for a trace of {plan.num_points} points; this trace has {n}: re-plan from this trace"]
    # Note [recompute reads parameters early]: a re-run block reads what its forward read.
    given, trace = trace, with_reruns(trace, [parse_block(b) for b in plan.recomputed_blocks])
    held_by: Dict[int, List[Tuple[int, int, int]]] = {}
    for i, d in enumerate(plan.decisions):
        before = len(p)
        _check_decision(i, d, trace, hardware, p)
        if len(p) == before:
            held_by.setdefault(d.record, []).extend((a, b, i) for a, b in interval_range(d.evict_point, d.deadline_point, n))
    for record, spans in held_by.items():
        spans.sort()
        for (a0, b0, i0), (a1, b1, i1) in zip(spans, spans[1:]):
            if a1 < b0:
                p.append(f"decisions {i0} and {i1} ({trace.tensors[record].key!r}) overlap in intervals {a1}..{b0 - 1}")
    budgets = {"device": plan.device_budget_bytes, **dict(plan.tier_budgets)}
    if timeline is None or trace is not given:  # a timeline handed in is of the trace without its re-runs
        timeline = memory_timeline(trace)
    mem = plan_memory(timeline.interval_peak_bytes, plan.decisions, [t for t in budgets if t != "device"])
    for tier, series in mem.items():
        worst = max(range(len(series)), key=series.__getitem__) if series else 0
        if series and series[worst] > budgets[tier]:
            p.append(f"{tier} budget exceeded at interval {worst}: {series[worst]} bytes > {budgets[tier]} bytes")
    return p
