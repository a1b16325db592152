"""Does the traced iteration repeat? Compare every iteration of a trace with the first.

A plan made from one iteration is valid for the next only when the graph is static: the same
points in the same order, and the same tensors (keys, categories, sizes, dtypes) born, used and
freed at the same offsets. When something differs, the first difference is reported with the
point where it shows, so the runtime (and the user) know where the plan stops applying.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from tierflow.profiling.trace import Category, LifetimeTrace, TensorRecord

__all__ = ["Divergence", "Stability", "check_stability", "latest_frees"]


@dataclass(frozen=True)
class Divergence:
    """Where an iteration first differs from iteration 0.

    Attributes:
        iteration: The iteration that differs.
        point: Index in ``trace.points`` where the difference shows.
        offset: The same position counted from the iteration's start point.
        key: The tensor whose record differs (None when the points themselves differ).
        reason: One line saying what differs.
    """

    iteration: int
    point: int
    offset: int
    key: Optional[str]
    reason: str


@dataclass(frozen=True)
class Stability:
    """The verdict over all iterations of a trace.

    Attributes:
        num_iterations: Iterations compared.
        static: True when every iteration repeats iteration 0.
        divergence: The first difference (None when static).
    """

    num_iterations: int
    static: bool
    divergence: Optional[Divergence]

    def describe(self) -> str:
        """One line for reports."""
        if self.num_iterations < 2:
            return "unknown: trace 2 or more iterations to check that keys, sizes and order repeat"
        if self.static:
            return f"static: {self.num_iterations} iterations repeat keys, sizes and order"
        d = self.divergence
        return f"dynamic: iteration {d.iteration} diverges at point {d.point} (offset {d.offset}): {d.reason}"


# (category, size_bytes, dtype, born offset or None, freed offset or None, use offsets)
_Signature = Tuple[Category, int, str, Optional[int], Optional[int], Tuple[int, ...]]


def _signatures(trace: LifetimeTrace, iteration: int, start: int, end: int) -> Dict[str, _Signature]:
    t_start, t_end = trace.points[start].tick, trace.points[end].tick
    out: Dict[str, _Signature] = {}
    for r in trace.tensors:
        if r.created_tick > t_end or (r.freed_tick is not None and r.freed_tick < t_start):
            continue  # not alive during this iteration
        if r.iteration is None and r.category is Category.INPUT:
            continue  # memory the optimizer holds (Note [what the optimizer holds] in ``_table``)
        if r.iteration is not None and r.iteration < iteration:
            # Note [leftovers]: a tensor an earlier iteration left behind (the loop's last loss,
            # say). Iteration 0's own leftovers were made before tracing and are invisible, so
            # comparing them would report every loop that keeps one as dynamic.
            continue
        born = r.created - start if r.created_tick > t_start else None
        freed = r.freed - start if r.freed_tick is not None and r.freed_tick < t_end else None
        uses = tuple(u - start for u in r.uses if start <= u <= end)
        out[r.key] = (r.category, r.size_bytes, r.dtype, born, freed, uses)
    return out


# Note [frees that jitter]: a temporary that a collective's worker thread releases (gloo's copy of
# a reduce-scatter input under FSDP2: Note [allocations no operation shows] in ``_table``) is freed
# when that thread is done, a few points earlier or later from one iteration to the next, while its
# birth and every use repeat. That is not another graph: before, every FSDP2 run warned that its
# profiled iterations differ. Such a record is taken as repeating, and the plan counts it until
# the latest point any profiled iteration freed it (:func:`latest_frees`): never less than it lives.


def _jitters(ref: _Signature, got: _Signature) -> bool:
    """Only the free of a temporary differs (Note [frees that jitter])."""
    return ref[0] is Category.TEMPORARY and ref[:4] == got[:4] and ref[5] == got[5]


def latest_frees(trace: LifetimeTrace) -> LifetimeTrace:
    """``trace`` with each temporary of its last iteration freed at the latest offset any of its
    iterations freed that key at (Note [frees that jitter]); records of other keys are unchanged."""
    bounds = trace.iteration_bounds()
    if len(bounds) < 2:
        return trace
    last = _signatures(trace, len(bounds) - 1, *bounds[-1])
    latest: Dict[str, Optional[int]] = {k: sig[4] for k, sig in last.items() if sig[0] is Category.TEMPORARY}
    for i, (s, e) in enumerate(bounds[:-1]):
        for key, sig in _signatures(trace, i, s, e).items():
            if key in latest and latest[key] is not None and _jitters(last[key], sig):
                latest[key] = None if sig[4] is None else max(latest[key], sig[4])
    s = bounds[-1][0]
    ticks = [p.tick for p in trace.points]
    tensors = []
    for r in trace.tensors:
        if r.iteration == len(bounds) - 1 and r.freed is not None and r.key in latest and \
                (latest[r.key] is None or s + latest[r.key] > r.freed):
            r = _freed_at(r, None if latest[r.key] is None else s + latest[r.key], ticks)
        tensors.append(r)
    return replace(trace, tensors=tuple(tensors))


def _freed_at(r: TensorRecord, point: Optional[int], ticks: List[int]) -> TensorRecord:
    """``r`` freed in interval ``point`` (None: after the trace), after that interval's other
    events; where the clock has no tick left there, at the next point (one interval longer)."""
    if point is None:
        return replace(r, freed=None, freed_tick=None)
    if ticks[point + 1] - 1 > ticks[point]:
        return replace(r, freed=point, freed_tick=ticks[point + 1] - 1)
    return replace(r, freed=point + 1, freed_tick=ticks[point + 1])


def _by_interval(sigs: Dict[str, _Signature]) -> Tuple[Dict[str, _Signature], Dict[str, str]]:
    """``sigs`` with the temporaries born in each interval compared as a set: keyed by their place
    when sorted by what they are and how they live, with the real key of every new key. The order
    of births inside one interval is not the graph (Note [temporaries of the step] in ``_table``)."""
    out: Dict[str, _Signature] = {}
    names: Dict[str, str] = {}
    born_in: Dict[int, List[Tuple[str, _Signature]]] = {}
    for key, sig in sigs.items():
        if sig[0] is Category.TEMPORARY and sig[3] is not None:
            born_in.setdefault(sig[3], []).append((key, sig))
        else:
            out[key], names[key] = sig, key
    for born, items in born_in.items():
        items.sort(key=lambda ks: (ks[1][1], ks[1][2], ks[1][5], -1 if ks[1][4] is None else ks[1][4]))
        for i, (key, sig) in enumerate(items):
            out[f"@{born}#{i}"], names[f"@{born}#{i}"] = sig, key
    return out, names


def _first_offset(sig: _Signature) -> int:
    events = [x for x in (sig[3], *sig[5]) if x is not None]
    return min(events) if events else 0


def _show(value: object) -> object:
    return value.value if isinstance(value, Category) else value


def _where_differs(ref: _Signature, got: _Signature) -> Tuple[int, str]:
    """Earliest offset at which two signatures of one key differ, and what differs."""
    if ref[:3] != got[:3]:
        what = ", ".join(f"{name} {_show(g)} (iteration 0: {_show(r)})"
                         for name, r, g in zip(("category", "size_bytes", "dtype"), ref[:3], got[:3]) if r != g)
        return min(_first_offset(ref), _first_offset(got)), what
    if ref[3] != got[3]:
        born = [b for b in (ref[3], got[3]) if b is not None]
        return min(born), f"born at offset {got[3]} (iteration 0: {ref[3]}; None = before the iteration)"
    if ref[5] != got[5]:
        for a, b in zip(ref[5], got[5]):
            if a != b:
                return min(a, b), f"used at offset {b} where iteration 0 used it at {a}"
        longer, which = (ref[5], "no longer") if len(ref[5]) > len(got[5]) else (got[5], "additionally")
        extra = longer[min(len(ref[5]), len(got[5]))]
        return extra, f"{which} used at offset {extra}"
    freed = [f for f in (ref[4], got[4]) if f is not None]
    return min(freed), f"freed at offset {got[4]} (iteration 0: {ref[4]}; None = after the iteration)"


def check_stability(trace: LifetimeTrace) -> Stability:
    """Compare iterations 1..k-1 of ``trace`` with iteration 0.

    Args:
        trace: A trace of one or more iterations (one iteration is trivially static).

    Returns:
        The verdict and, for a dynamic graph, the first divergence: the earliest differing
        point of the first iteration that differs.
    """
    bounds = trace.iteration_bounds()
    if len(bounds) < 2:
        return Stability(num_iterations=len(bounds), static=True, divergence=None)
    s0, e0 = bounds[0]
    ref_labels = [p.label for p in trace.points[s0:e0 + 1]]
    ref_sigs, ref_names = _by_interval(_signatures(trace, 0, s0, e0))
    for i, (s, e) in enumerate(bounds[1:], start=1):
        labels = [p.label for p in trace.points[s:e + 1]]
        if labels != ref_labels:
            j = next((j for j, (a, b) in enumerate(zip(ref_labels, labels)) if a != b),
                     min(len(labels), len(ref_labels)))
            expected = ref_labels[j] if j < len(ref_labels) else "the end of the iteration"
            found = labels[j] if j < len(labels) else "the end of the iteration"
            return Stability(len(bounds), False, Divergence(i, min(s + j, e), j, None,
                                                            f"point {found!r} where iteration 0 had {expected!r}"))
        sigs, names = _by_interval(_signatures(trace, i, s, e))
        # (offset, born offset or -1 for "before the iteration", key, reason): at one offset the
        # tensor that existed first is the cause (an input whose size changed, not its products).
        found_at: List[Tuple[int, int, str, str]] = []
        for slot in set(ref_sigs) | set(sigs):
            ref, got = ref_sigs.get(slot), sigs.get(slot)
            key = ref_names.get(slot) or names[slot]
            if ref == got or (ref is not None and got is not None and _jitters(ref, got)):
                continue
            born = min(-1 if sig[3] is None else sig[3] for sig in (ref, got) if sig is not None)
            if ref is None:
                found_at.append((_first_offset(got), born, key, f"tensor {key!r} is new (not in iteration 0)"))
            elif got is None:
                found_at.append((_first_offset(ref), born, key, f"tensor {key!r} of iteration 0 is missing"))
            else:
                offset, what = _where_differs(ref, got)
                if ref[0] is Category.OPTIMIZER_STATE and ref[3] is not None and got[3] is None:
                    what += "; optimizer state is created in the first step: run one step before tracing"
                found_at.append((offset, born, key, f"tensor {key!r}: {what}"))
        if found_at:
            offset, _, key, reason = min(found_at)
            return Stability(len(bounds), False, Divergence(i, s + offset, offset, key, reason))
    return Stability(num_iterations=len(bounds), static=True, divergence=None)
