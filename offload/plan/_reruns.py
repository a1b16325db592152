"""Where a recomputed block re-runs in backward, and what its re-run reads there.

Note [recompute reads parameters early] (the planner's side; the runtime's is in
:mod:`tierflow.offload.runtime._exec`): the runtime recomputes block ``B`` by running its forward
under activation checkpointing, and ``torch.utils.checkpoint`` re-runs that forward at the first
unpack, in backward, of anything saved inside it. The trace was made without checkpointing, so
it shows no read there: ``B``'s parameters are next used where its backward needs them (or only
at the optimizer step), and a plan made from the trace alone may hold them away when the block
re-runs; the runtime then fetches them on demand, over budget. So a plan that recomputes ``B``
treats the re-run as a use, at its point, of everything ``B``'s forward read that existed before
it ran (its parameters; its inputs, which the checkpoint keeps anyway). What ``B`` created is
re-created, not read: the recompute decisions account for those bytes.

:func:`rerun_points` finds the point: the first use, in the backward pass after ``B``'s forward,
of an activation saved inside ``B`` or of one of ``B``'s parameters (the first unpack happens in
that interval). :func:`with_reruns` returns a copy of the trace with the re-run reads as uses;
policies plan on it, the validator checks a plan against it, the simulator re-runs the block there.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Dict, Iterable, Optional, Tuple

from tierflow.profiling.trace import ROOT_PATH, PointKind

__all__ = ["block_of", "forward_spans", "parse_block", "rerun_points", "with_reruns"]

Block = Tuple[str, int]
#: Points of a backward pass, and the points that end one (a hand-built trace may lack the start).
_BACKWARD = frozenset({PointKind.BACKWARD_START, PointKind.BACKWARD_PRE, PointKind.BACKWARD_POST, PointKind.GRAD_READY})
_AFTER_BACKWARD = frozenset({PointKind.BACKWARD_END, PointKind.OPTIMIZER_PRE, PointKind.OPTIMIZER_POST,
                             PointKind.ITERATION_END, PointKind.FORWARD_PRE})


def forward_spans(trace) -> Dict[Block, Tuple[int, int]]:
    """``(module path, call index) -> (forward_pre point, forward_post point)`` of every module call.

    Its forward runs in intervals ``pre .. post - 1``; spans of two calls are nested or disjoint.
    """
    open_: Dict[Tuple[str, int, int], int] = {}
    out: Dict[Block, Tuple[int, int]] = {}
    for i, p in enumerate(trace.points):
        if p.kind is PointKind.FORWARD_PRE:
            open_[(p.name, p.call_index, p.iteration)] = i
        elif p.kind is PointKind.FORWARD_POST and (p.name, p.call_index, p.iteration) in open_:
            out[(p.name, p.call_index)] = (open_.pop((p.name, p.call_index, p.iteration)), i)
    return out


def block_of(key: str) -> Optional[Block]:
    """``module[call]:saved<i>`` -> ``(module, call)``; None for other keys."""
    head, sep, _ = key.rpartition(":saved")
    if not sep or not head.endswith("]") or "[" not in head:
        return None
    name, _, call = head[:-1].rpartition("[")
    return (name, int(call)) if call.isdigit() else None


def parse_block(name: str) -> Block:
    """``module[call]`` (as in ``OffloadPlan.recomputed_blocks``) -> ``(module, call)``."""
    path, _, call = name[:-1].rpartition("[")
    return path, int(call)


def rerun_points(trace, blocks: Iterable[Block]) -> Dict[Block, int]:
    """The point after which each block's checkpointed forward re-runs (blocks never read again in
    a backward pass after their forward are left out)."""
    spans = forward_spans(trace)
    want = {blk: spans[blk] for blk in blocks if blk in spans}
    if not want:
        return {}
    kinds = [p.kind for p in trace.points]
    window: Dict[Block, Tuple[int, int]] = {}
    for blk, (_, b) in want.items():
        lo = next((i for i in range(b + 1, len(kinds)) if kinds[i] in _BACKWARD), None)
        if lo is not None:
            hi = next((i for i in range(lo + 1, len(kinds)) if kinds[i] in _AFTER_BACKWARD), len(kinds))
            window[blk] = (lo, hi)
    out: Dict[Block, int] = {}
    for r in trace.tensors:
        cat = r.category.value
        if cat == "activation":
            saver = spans.get(block_of(r.key))
            if saver is None:
                continue
            owners = [blk for blk, (a, b) in want.items() if a <= saver[0] and saver[1] <= b]
        elif cat == "param":
            owners = [blk for blk in want if blk[0] == ROOT_PATH or r.key.startswith(blk[0] + ".")]
        else:
            continue
        for blk in owners:
            if blk not in window:
                continue
            lo, hi = window[blk]
            k = bisect.bisect_left(r.uses, lo)
            if k < len(r.uses) and r.uses[k] < min(hi, out.get(blk, hi)):
                out[blk] = r.uses[k]
    return out


def with_reruns(trace, blocks: Iterable[Block]):
    """``trace`` with each block's re-run point added as a use of what its forward read.

    Read: used during the block's forward and created before it; still alive at the re-run point
    (a tensor the trace freed earlier is not made to live longer here). An activation saved
    inside the block is left out: checkpointed, the block saves nothing through the runtime's
    hooks, so no decision moves it (Note [recompute regions] in :mod:`tierflow.offload.plan.context`).
    """
    points = rerun_points(trace, blocks)
    if not points:
        return trace
    spans = forward_spans(trace)
    tensors = list(trace.tensors)
    for blk, at in points.items():
        a, b = spans[blk]
        for i, r in enumerate(tensors):
            if (r.created is not None and r.created >= a) or (r.freed is not None and r.freed < at):
                continue
            saver = spans.get(block_of(r.key)) if r.category.value == "activation" else None
            if saver is not None and a <= saver[0] and saver[1] <= b:
                continue
            k = bisect.bisect_left(r.uses, a)  # uses are sorted
            if k < len(r.uses) and r.uses[k] < b and at not in r.uses:
                tensors[i] = replace(r, uses=tuple(sorted((*r.uses, at))))
    return replace(trace, tensors=tuple(tensors))
