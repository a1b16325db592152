"""The ``LifetimeTrace`` contract: runtime points, tensor records, and how keys are spelled.

A trace is pure data (frozen dataclasses and enums, no tensors): the ordered *points* where a
runtime can act, each with the compute measured since the previous point, and one record per
tensor storage born or seen during the traced iterations. Everything else (timelines, peaks, idle
intervals, stability) is derived from it by pure functions in the sibling modules.

Note [points and intervals]: interval ``p`` is the compute between point ``p`` and point ``p + 1``.
A record ``created`` at ``p`` was allocated in interval ``p``; it is *used* at ``p`` when an
operation in interval ``p`` reads or writes it; it is ``freed`` at ``p`` when its storage was
released in interval ``p``. ``Point.compute_s`` is the compute of the interval *before* the
point, so interval ``p`` lasts ``points[p + 1].compute_s``.

Note [ticks]: allocations, frees and points share one integer clock (``tick``) that orders every
event of the trace. Point indices say where the runtime can act; ticks give the exact order
inside an interval, so the true high-water mark is known, not only the value at points.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Optional, Tuple

__all__ = [
    "Category",
    "LifetimeTrace",
    "Phase",
    "Point",
    "PointKind",
    "TensorRecord",
    "activation_key",
    "grad_key",
    "input_key",
    "point_label",
    "state_key",
    "validate_trace",
]

#: Module path used for the traced model itself in activation keys and point names.
ROOT_PATH = "<model>"
#: Module path for activations saved outside the model (the loss, for instance).
OUTSIDE_PATH = "<outside>"


class Category(str, Enum):
    """What a tensor storage is to training (decides how it may be offloaded)."""

    PARAM = "param"
    GRAD = "grad"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATION = "activation"  # saved by autograd for the backward pass
    TEMPORARY = "temporary"  # anything else allocated during the iteration
    INPUT = "input"  # handed to the model from outside (or existed before and is not model state)
    BUFFER = "buffer"


class PointKind(str, Enum):
    """Where in the iteration a point sits: each is a place the offload runtime can hook."""

    ITERATION_START = "iteration_start"
    FORWARD_PRE = "forward_pre"
    FORWARD_POST = "forward_post"
    BACKWARD_START = "backward_start"  # first operation of an autograd graph task
    BACKWARD_PRE = "backward_pre"  # first gradient of a module's outputs is ready
    BACKWARD_POST = "backward_post"  # gradients of all of a module's inputs are ready
    GRAD_READY = "grad_ready"  # a parameter's .grad was accumulated
    BACKWARD_END = "backward_end"  # the graph task finished
    OPTIMIZER_PRE = "optimizer_pre"
    OPTIMIZER_POST = "optimizer_post"
    ITERATION_END = "iteration_end"


class Phase(str, Enum):
    """The training phase of the interval that follows a point (for reports and plots)."""

    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    OTHER = "other"


def point_label(kind: "PointKind", name: str, call_index: int) -> str:
    """The one spelling of a point: ``kind name[call]``, e.g. ``forward_pre h.0.attn[0]``.

    The tracer records it, the runtime matches live points against it; both call this.
    """
    return f"{kind.value} {name}[{call_index}]"


@dataclass(frozen=True, slots=True)
class Point:
    """One runtime point.

    Attributes:
        kind: Which hook produced it.
        name: Module path, parameter name, optimizer class, or ``iteration``.
        call_index: The how-many-th call of this module in this iteration (0 for other kinds).
        iteration: The traced iteration it belongs to (0-based).
        phase: Phase of the interval that follows the point.
        compute_s: Measured compute (seconds) since the previous point, device-synchronised on
            CUDA, with the tracer's own bookkeeping time subtracted.
        tick: Position on the trace's event clock (see Note [ticks]).
    """

    kind: PointKind
    name: str
    call_index: int
    iteration: int
    phase: Phase
    compute_s: float
    tick: int

    @property
    def label(self) -> str:
        """``kind name[call]``: the same string at the same place of every iteration."""
        return point_label(self.kind, self.name, self.call_index)


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One tensor storage (views share their base storage and appear once).

    Attributes:
        key: Stable across iterations: the parameter name; ``name:grad``; ``name:<state>``;
            ``module[call]:saved<i>`` for activations; ``input<i>``; for temporaries the label
            of the point they follow plus an ordinal.
        category: See :class:`Category`.
        size_bytes: Bytes of the storage.
        dtype: ``torch`` dtype name of the first tensor seen on the storage, e.g. ``float32``.
        device: e.g. ``cpu`` or ``cuda:0``.
        iteration: Iteration it was born in; None when it existed before the trace.
        created: Point it was created at (Note [points and intervals]); None before the trace.
        freed: Point it was freed at; None when still alive at the end of the trace.
        uses: Sorted distinct points at which an operation read or wrote it.
        created_tick: Clock value of the allocation (-1 before the trace).
        freed_tick: Clock value of the free; None when still alive.
    """

    key: str
    category: Category
    size_bytes: int
    dtype: str
    device: str
    iteration: Optional[int]
    created: Optional[int]
    freed: Optional[int]
    uses: Tuple[int, ...]
    created_tick: int
    freed_tick: Optional[int]


@dataclass(frozen=True)
class LifetimeTrace:
    """Points and tensor records of one or more traced training iterations.

    Attributes:
        points: In execution order; a point's index is its position here.
        tensors: In birth order (pre-existing storages first).
        num_iterations: How many iterations were traced.
        model: The traced module's class name.
        optimizer: The optimizer's class name ('' without one).
        device: Device of the model's first parameter, e.g. ``cuda:0``.
    """

    points: Tuple[Point, ...]
    tensors: Tuple[TensorRecord, ...]
    num_iterations: int
    model: str = ""
    optimizer: str = ""
    device: str = "cpu"

    def iteration_bounds(self) -> List[Tuple[int, int]]:
        """``(start, end)`` point indices of each iteration's start and end points, in order."""
        starts = [i for i, p in enumerate(self.points) if p.kind is PointKind.ITERATION_START]
        ends = [i for i, p in enumerate(self.points) if p.kind is PointKind.ITERATION_END]
        return list(zip(starts, ends))


def grad_key(param_name: str) -> str:
    """Key of a parameter's gradient, e.g. ``blocks.0.mlp.up.weight:grad``."""
    return f"{param_name}:grad"


def state_key(param_name: str, state_name: str) -> str:
    """Key of one optimizer state tensor, e.g. ``blocks.0.mlp.up.weight:exp_avg``."""
    return f"{param_name}:{state_name}"


def activation_key(module_path: str, call_index: int, saved_index: int) -> str:
    """Key of an activation saved for backward, e.g. ``blocks.0.mlp.act[0]:saved0``."""
    return f"{module_path}[{call_index}]:saved{saved_index}"


def input_key(ordinal: int) -> str:
    """Key of the ``ordinal``-th input handed to the model in an iteration."""
    return f"input{ordinal}"


def validate_trace(trace: LifetimeTrace) -> List[str]:
    """Check a trace's internal consistency.

    Args:
        trace: The trace to check.

    Returns:
        Every problem found, one line each (empty when the trace is consistent).
    """
    problems: List[str] = []
    points = trace.points
    n = len(points)
    if trace.num_iterations < 1:
        problems.append(f"num_iterations={trace.num_iterations} must be >= 1")
    bounds = trace.iteration_bounds()
    if len(bounds) != trace.num_iterations:
        problems.append(f"{len(bounds)} complete iteration start/end pairs for num_iterations={trace.num_iterations}")
    for i, p in enumerate(points):
        if i and p.tick <= points[i - 1].tick:
            problems.append(f"point {i} ({p.label}): tick {p.tick} does not increase")
        if p.compute_s < 0:
            problems.append(f"point {i} ({p.label}): negative compute_s {p.compute_s}")
        if not 0 <= p.iteration < max(trace.num_iterations, 1):
            problems.append(f"point {i} ({p.label}): iteration {p.iteration} out of range")
    ticks = [p.tick for p in points]
    seen: Dict[Tuple[Optional[int], str], int] = {}
    for j, r in enumerate(trace.tensors):
        where = f"tensor {j} ({r.key!r})"
        if r.size_bytes < 0:
            problems.append(f"{where}: negative size_bytes {r.size_bytes}")
        if (r.created is None) != (r.iteration is None) or (r.created is None) != (r.created_tick < 0):
            problems.append(f"{where}: created, iteration and created_tick disagree on whether it predates the trace")
        if (r.freed is None) != (r.freed_tick is None):
            problems.append(f"{where}: freed and freed_tick disagree")
        for name, p in (("created", r.created), ("freed", r.freed)):
            if p is not None and not 0 <= p < n:
                problems.append(f"{where}: {name} point {p} outside 0..{n - 1}")
        if list(r.uses) != sorted(set(r.uses)):
            problems.append(f"{where}: uses are not sorted and distinct")
        if r.uses and not 0 <= r.uses[0] <= r.uses[-1] < n:
            problems.append(f"{where}: uses {r.uses[0]}..{r.uses[-1]} outside 0..{n - 1}")
        if r.uses and r.created is not None and r.uses[0] < r.created:
            problems.append(f"{where}: used at point {r.uses[0]} before its creation at {r.created}")
        if r.uses and r.freed is not None and r.uses[-1] > r.freed:
            problems.append(f"{where}: used at point {r.uses[-1]} after it was freed at {r.freed}")
        if r.freed_tick is not None and r.freed_tick <= r.created_tick:
            problems.append(f"{where}: freed_tick {r.freed_tick} not after created_tick {r.created_tick}")
        for name, p, t in (("created", r.created, r.created_tick), ("freed", r.freed, r.freed_tick)):
            # An event at point p happens at or after the point's tick and before the next one's.
            if p is not None and t is not None and 0 <= p < n and not (
                    ticks[p] <= t and (p + 1 == n or t < ticks[p + 1])):
                problems.append(f"{where}: {name}_tick {t} does not fall in interval {p}")
        slot = (r.iteration, r.key)
        if slot in seen:
            problems.append(f"{where}: key repeats tensor {seen[slot]} in the same iteration")
        seen[slot] = j
    return problems
