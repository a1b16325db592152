"""Pure functions that turn a profiled trace and its plan into what the runtime executes.

* :func:`one_iteration`: the last (steadiest) traced iteration as a trace of its own: the plan
  is made for one iteration, run as a cycle.
* :func:`pin_unmovable`: a copy of the trace in which tensors the runtime cannot find on a live
  iteration (temporaries, inputs, buffers) have no idle interval, so no policy picks them; their
  bytes still count in every interval.
* :class:`Schedule`: per point, which decisions start an offload, free memory, start a prefetch,
  or wait for one; the expected point labels (divergence is a label that differs) and per key
  the points it is used at (the fallback's next-use hints).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

from tierflow.offload.plan import block_of, forward_spans
from tierflow.offload.plan.types import Action, OffloadPlan, absent_intervals
from tierflow.profiling.idle import idle_intervals
from tierflow.profiling.timeline import MemoryTimeline, memory_timeline
from tierflow.profiling.trace import LifetimeTrace, PointKind, TensorRecord

__all__ = ["EMPTY_SCHEDULE", "MOVABLE", "Schedule", "make_schedule", "one_iteration", "pin_unmovable"]

#: Categories the runtime can find by key on a live iteration and move.
MOVABLE: FrozenSet[str] = frozenset({"param", "grad", "optimizer_state", "activation"})


def one_iteration(trace, index: int = -1):
    """Iteration ``index`` of ``trace`` as a one-iteration :class:`~tierflow.profiling.trace.LifetimeTrace`.

    Records alive when the iteration starts become pre-existing (``created`` None), records
    still alive when it ends are not freed; points are renumbered from 0.

    Raises:
        ValueError: the trace has no complete iteration ``index``.
    """

    bounds = trace.iteration_bounds()
    if not bounds:
        raise ValueError("the trace holds no complete iteration; profile at least one")
    try:
        s, e = bounds[index]
    except IndexError:
        raise ValueError(f"iteration {index} is not in a trace of {len(bounds)} iterations") from None
    t_s, t_e = trace.points[s].tick, trace.points[e].tick
    points = tuple(replace(p, iteration=0) for p in trace.points[s:e + 1])
    tensors: List[TensorRecord] = []
    for r in trace.tensors:
        if r.created_tick > t_e or (r.freed_tick is not None and r.freed_tick < t_s):
            continue
        born = r.created is not None and r.created_tick >= t_s
        freed = r.freed_tick is not None and r.freed_tick < t_e
        tensors.append(replace(
            r, iteration=0 if born else None, created=r.created - s if born else None,
            created_tick=r.created_tick if born else -1, freed=r.freed - s if freed else None,
            freed_tick=r.freed_tick if freed else None, uses=tuple(u - s for u in r.uses if s <= u <= e)))
    return LifetimeTrace(points=points, tensors=tuple(tensors), num_iterations=1, model=trace.model,
                         optimizer=trace.optimizer, device=trace.device)


def pin_unmovable(trace, movable: FrozenSet[str] = MOVABLE):
    """``trace`` with no idle interval where the runtime cannot find a tensor by its key.

    Records outside ``movable`` are used at every point of their life; a gradient is used from
    its creation until its parameter's gradient-ready point (before that it is autograd's, not yet
    ``param.grad``); an activation from its creation until its first use after it, or the end of
    the forward of the module that saved it if sooner (where it is saved, the moment the runtime
    learns its key). No policy can then choose those stretches,
    while every byte still counts in the memory timeline, so plans made from the result are exact
    about what stays.

    Note [pinned until saved]: a tensor saved by the operation that made it (the noise a CPU
    dropout multiplies by, made and saved in one interval) has no use after its creation until
    backward, so "until its first use after creation" pinned it through the whole forward and
    backward gap: no plan could move a dropout mask, a softmax's or a tanh's output (GPT-2's
    feasible floor with dropout: 62.9% of its peak, 25.8% since; ``benchmarks/feasible_floor.py``).
    The runtime knows the key once the saving module's forward returns, whatever the next use.
    """

    last = len(trace.points) - 1
    ready: Dict[str, List[int]] = {}
    for i, p in enumerate(trace.points):
        if p.kind is PointKind.GRAD_READY:
            ready.setdefault(p.name, []).append(i)
    records = {iv.record for iv in idle_intervals(trace)}
    spans = forward_spans(trace)
    tensors = list(trace.tensors)
    for i in records:
        r = tensors[i]
        first = r.created if r.created is not None else 0
        end = r.freed if r.freed is not None else last
        if r.category.value not in movable:
            pinned = range(first, end + 1)
        elif r.category.value == "grad" and r.created is not None:
            points = ready.get(r.key.rpartition(":")[0], [])
            k = bisect.bisect_left(points, first)
            pinned = range(first, min(points[k] if k < len(points) else end, end) + 1)
        elif r.category.value == "activation" and r.created is not None:
            # Note [pinned until saved]: saved by the time the saving module's forward returns.
            later = [u for u in r.uses if u > first]
            saved_by = spans.get(block_of(r.key))
            last_unknown = later[0] if later else end
            if saved_by is not None and saved_by[1] >= first:
                last_unknown = min(last_unknown, saved_by[1])
            pinned = range(first, last_unknown + 1)
        else:
            continue
        tensors[i] = replace(r, uses=tuple(sorted(set(r.uses) | set(pinned))))
    return replace(trace, tensors=tuple(tensors))


@dataclass(frozen=True)
class Schedule:
    """What the runtime does at each point of one iteration (Note [decision points] in plan.py).

    Attributes:
        labels: Expected point labels, in order.
        evicts, frees, prefetches, deadlines: Per point, indices into ``plan.decisions``.
        absent_at_start: Swap decisions whose tensor is off the device when an iteration starts
            (wrapped windows): the first planned iteration evicts them at its start.
        writing_at_start: Wrapped swap decisions whose copy out is under way when an iteration
            starts (issued late in the previous one): the first planned iteration starts it.
        uses: Per key, the sorted points it is used at (next-use hints for the fallback).
        sizes: Per key, its bytes in the trace (the reservation, for a key whose size varies:
            Note [size reservations] in :mod:`tierflow.profiling.shapes`).
        activations: Keys of the activations the trace saw.
        interval_peak: The trace's unplanned device peak per interval.
        index_of: Per point label, its index (where a diverged iteration is, when labels match).
        unobservable: Points that start an empty graph task (Note [unobservable graph tasks] in
            :func:`_empty_graph_tasks`).
        recomputed: Per recomputed block (``module[call]``), per interval the bytes of the plan's
            recompute decisions through it: what its checkpointed forward did not keep.
        varying: Activation keys planned at a reservation (their real sizes scale temporaries).
        scaled: Per temporary planned at a reservation, its scope (Note [temporaries follow
            their scope] in :mod:`tierflow.profiling.shapes`) and its reservation.
        trace: The one iteration planned (at reserved sizes), replayed at an iteration's real
            sizes by the accounting when they differ.
    """

    labels: Tuple[str, ...]
    evicts: Tuple[Tuple[int, ...], ...]
    frees: Tuple[Tuple[int, ...], ...]
    prefetches: Tuple[Tuple[int, ...], ...]
    deadlines: Tuple[Tuple[int, ...], ...]
    absent_at_start: Tuple[int, ...]
    writing_at_start: Tuple[int, ...]
    uses: Dict[str, Tuple[int, ...]]
    sizes: Dict[str, int]
    activations: FrozenSet[str]
    interval_peak: Tuple[int, ...]
    index_of: Dict[str, int]
    unobservable: FrozenSet[int] = frozenset()
    recomputed: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    varying: FrozenSet[str] = frozenset()
    scaled: Dict[str, Tuple[str, int]] = field(default_factory=dict)
    trace: Any = field(default=None, repr=False)
    forward_end: Dict[int, int] = field(default_factory=dict)

    def calls_not_made(self, pos: int, label: str, not_run: Set[str]) -> Optional[Tuple[int, Set[str]]]:
        """Where point ``label`` is, when the points from ``pos`` up to it are only those of module
        calls this iteration did not make: ``(its index, the modules skipped)``; None otherwise.

        Note [module calls not made]: a model may skip a module call the trace has (an expert no
        token was routed to: ``if idx.numel(): expert(x[idx])``; a branch not taken). Its points
        never come, so the next point reads as another than the trace's: the iteration diverged,
        and with many experts nearly every step did. When every point between here and the one
        that came is of whole forward calls (their forward_pre .. forward_post), or in backward of
        the modules (and their parameters) already skipped in this iteration's forward, the calls
        were simply not made: the executor acts at the skipped points (what they evict does not
        exist and is passed over; what they prefetch comes back) and goes on with the plan.
        """
        q, skipped = pos, set()
        labels, n = self.labels, self.num_points
        while q < n and labels[q] != label:
            end = self.forward_end.get(q)
            if end is not None:  # a whole forward call: forward_pre .. its forward_post
                skipped.add(labels[q].partition(" ")[2].partition("[")[0])
                q = end + 1
                continue
            kind, _, name = labels[q].partition(" ")
            if kind in _BACKWARD_KINDS and made_within(name.partition("[")[0], not_run | skipped):
                q += 1
                continue
            return None
        return (q, skipped) if q < n and q > pos else None

    @property
    def num_points(self) -> int:
        return len(self.labels)

    def next_use(self, key: str, point: int) -> Optional[int]:
        """Points from ``point`` to the next use of ``key`` (wrapping around); None if unknown."""
        uses = self.uses.get(key)
        if not uses:
            return None
        i = bisect.bisect_right(uses, point)
        return uses[i] - point if i < len(uses) else uses[0] + self.num_points - point


def made_within(name: str, modules: Set[str]) -> bool:
    """Whether ``name`` (a module path, a parameter's or saved tensor's key) belongs to one of
    ``modules`` or their submodules: ``m``, ``m.w:grad``, ``m[0]:saved1``, ``m.sub``..."""
    return any(name == m or name.startswith((m + ".", m + "[")) for m in modules)


#: Points of a module's backward, and of its parameters' gradients (Note [module calls not made]).
_BACKWARD_KINDS = frozenset(k.value for k in (PointKind.BACKWARD_PRE, PointKind.BACKWARD_POST, PointKind.GRAD_READY))

#: The schedule of no plan (the online executor's): no point expected, no decision, no hint.
EMPTY_SCHEDULE = Schedule(labels=(), evicts=(), frees=(), prefetches=(), deadlines=(), absent_at_start=(),
                          writing_at_start=(), uses={}, sizes={}, activations=frozenset(), interval_peak=(),
                          index_of={})


def make_schedule(trace, plan: OffloadPlan, *, timeline: Optional[MemoryTimeline] = None,
                  reserved: FrozenSet[str] = frozenset(), scopes: Optional[Dict[str, str]] = None) -> Schedule:
    """Index ``plan``'s swap decisions by point for the one-iteration ``trace`` it was made from.

    Recompute decisions are not scheduled here: their blocks run under activation checkpointing;
    only what each keeps off the device is recorded, for the accounting. ``reserved``: keys
    planned at a reservation; ``scopes``: the scope of each reserved temporary.
    """

    n = len(trace.points)
    scopes = scopes or {}
    tables: Dict[str, List[List[int]]] = {k: [[] for _ in range(n)] for k in ("evict", "free", "prefetch", "deadline")}
    absent_at_start, writing_at_start = [], []
    recomputed: Dict[str, List[int]] = {}
    for i, d in enumerate(plan.decisions):
        if d.action is Action.RECOMPUTE:
            per_interval = recomputed.setdefault(d.recompute_block, [0] * n)
            for a, b in absent_intervals(d, n):
                for q in range(a, b):
                    per_interval[q] += d.size_bytes
        if d.action is not Action.SWAP:
            continue
        tables["evict"][d.evict_point].append(i)
        tables["free"][d.free_point].append(i)
        tables["prefetch"][d.prefetch_point].append(i)
        tables["deadline"][d.deadline_point].append(i)
        if d.wraps and any(a == 0 for a, _ in absent_intervals(d, n)):
            absent_at_start.append(i)
        elif d.wraps and d.free_point < d.evict_point:
            writing_at_start.append(i)
    # Transfers issued at one point go earliest-needed first, as the simulator orders them.
    for name, attr in (("evict", "free_point"), ("prefetch", "deadline_point")):
        for p, ids in enumerate(tables[name]):
            ids.sort(key=lambda i: ((getattr(plan.decisions[i], attr) - p) % n, i))
    uses: Dict[str, Tuple[int, ...]] = {}
    sizes: Dict[str, int] = {}
    activations = set()
    for r in trace.tensors:
        if r.category.value in MOVABLE:
            uses[r.key] = tuple(r.uses)
            sizes[r.key] = r.size_bytes
            if r.category.value == "activation":
                activations.add(r.key)
    frozen = {k: tuple(tuple(ids) for ids in v) for k, v in tables.items()}
    return Schedule(labels=tuple(p.label for p in trace.points), evicts=frozen["evict"], frees=frozen["free"],
                    prefetches=frozen["prefetch"], deadlines=frozen["deadline"],
                    absent_at_start=tuple(absent_at_start), writing_at_start=tuple(writing_at_start), uses=uses, sizes=sizes,
                    activations=frozenset(activations),
                    interval_peak=tuple((timeline or memory_timeline(trace)).interval_peak_bytes),
                    index_of={p.label: i for i, p in reversed(list(enumerate(trace.points)))},
                    unobservable=frozenset(_empty_graph_tasks(trace.points)),
                    recomputed={blk: tuple(v) for blk, v in recomputed.items()},
                    forward_end={a: b for a, b in forward_spans(trace).values()},
                    varying=frozenset(k for k in reserved if k in activations),
                    scaled={r.key: (scopes[r.key], r.size_bytes) for r in trace.tensors if r.key in scopes},
                    trace=trace)


def _empty_graph_tasks(points) -> List[int]:
    """Indices of ``backward_start`` points directly followed by their own ``backward_end``.

    Note [unobservable graph tasks]: the tracer's dispatch mode sees operations that run in a
    backward callback after the graph task (DistributedDataParallel's reducer copying buckets into
    ``.grad``) as an empty graph task of their own: a ``backward_start``/``backward_end`` pair with
    nothing between. The runtime has no hook there; where such a pair is expected and a different
    point comes, the executor acts on both points at once and counts the graph task, instead of
    diverging.
    """

    return [i for i, (a, b) in enumerate(zip(points, points[1:]))
            if a.kind is PointKind.BACKWARD_START and b.kind is PointKind.BACKWARD_END and a.call_index == b.call_index]
