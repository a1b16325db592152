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
of an activation saved inside ``B`` (or, when none is, of one of ``B``'s parameters: a saved
weight); the first unpack happens in that interval. :func:`with_reruns` returns a copy of the
trace with the re-run reads as uses; policies plan on it, the validator checks a plan against it,
the simulator re-runs the block there.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Tuple

from tierflow.profiling.trace import ROOT_PATH, Category, PointKind, TensorRecord

__all__ = ["block_of", "forward_spans", "parse_block", "rerun_points", "saved_within", "with_reruns"]

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
    # Parameters count only for a block none of whose saved activations is used there: a
    # parameter the runtime may not move is "used" at every point of a planned trace (pinned:
    # tierflow.offload.runtime._schedule.pin_unmovable), which put every re-run at the start of
    # backward. An autograd node unpacks its saved weight and its saved input together.
    found: Dict[str, Dict[Block, int]] = {"activation": {}, "param": {}}
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
        out = found[cat]
        for blk in owners:
            if blk not in window:
                continue
            lo, hi = window[blk]
            k = bisect.bisect_left(r.uses, lo)
            if k < len(r.uses) and r.uses[k] < min(hi, out.get(blk, hi)):
                out[blk] = r.uses[k]
    return {**found["param"], **found["activation"]}


def with_reruns(trace, blocks: Iterable[Block]):
    """``trace`` as it runs with ``blocks`` re-run: what each re-run reads and re-makes is used at
    its re-run point, what the checkpoint keeps lives until the block's backward ends, and the
    re-run's own transient memory is a temporary at the start of the re-run interval. Applying it to its own
    result returns that result itself (a caller may then keep its memory timeline).

    Read: used during the block's forward and created before it. An activation saved inside the
    block but made before it (an input the checkpoint keeps) is left out: checkpointed, the block
    saves nothing through the runtime's hooks, so no decision moves it (Note [recompute regions]
    in :mod:`tierflow.offload.plan.context`).

    Note [a re-run re-makes the whole block]: ``torch.utils.checkpoint`` re-runs the block's
    forward once, at the first unpack, and every activation it saved is on the device again from
    there until its own backward use. The trace (made without checkpointing) shows each one
    unused until its own use, so a recompute decision over that whole gap counted it away while
    the re-run already held it (the runtime measured 1 MiB per block above its account, over the
    budget, on a block of two 1 MiB activations). So:

    * the re-run point is a use of every activation made and saved inside the block: a recompute
      decision covers the gap up to it, and the rest (re-made, waiting for its backward) is on
      the device in every model of the plan;
    * what the block read that the trace frees before the re-run (its input, when only the
      block used it: a dropout's) is held by the checkpoint until the block's backward ends,
      used (pinned) all along: the runtime cannot move what the checkpoint holds;
    * the re-run's forward makes more than it keeps (temporaries): its largest excess over the
      activations it re-makes, up to the last of them (the checkpoint stops there: early stop),
      is a temporary ``<block>:rerun`` at the start of the re-run interval, gone before anything
      else that interval makes: the re-run runs at the first unpack, when the backward node that
      needs the block's tensors starts, before that node allocates its gradients. (Live through
      the whole interval it was counted beside those gradients, and a GPT whose second attention
      block re-ran read 1.2% above the memory it held.) The event clock is doubled to fit it in
      any interval.
    """
    points = rerun_points(trace, blocks)
    if not points:
        return trace
    spans = forward_spans(trace)
    tensors = list(trace.tensors)
    have = {r.key for r in tensors}
    n = len(trace.points)
    ticks = [p.tick for p in trace.points]
    extra: List[Tuple[Block, int, int]] = []  # (block, re-run point, transient bytes)
    for blk, at in points.items():
        a, b = spans[blk]
        remade = {i for i, r in enumerate(tensors) if r.created is not None and a <= r.created < b
                  and r.category.value == "activation" and saved_within(spans, r.key, a, b)}
        done = max((tensors[i].uses[-1] for i in remade if tensors[i].uses), default=at)
        done = max(done, at)
        for i, r in enumerate(tensors):
            if r.created is not None and r.created >= a:
                if i in remade and r.created < b and at > r.created and at not in r.uses and \
                        (r.freed is None or r.freed >= at):
                    tensors[i] = replace(r, uses=tuple(sorted((*r.uses, at))))
                continue
            if r.category.value == "activation" and saved_within(spans, r.key, a, b):
                continue
            k = bisect.bisect_left(r.uses, a)  # uses are sorted
            if not (k < len(r.uses) and r.uses[k] < b):
                continue  # not read by the block's forward
            if r.freed is not None and r.freed < done and done + 1 < n:
                held = range(r.freed, done + 1)  # Note [a re-run re-makes the whole block]: the checkpoint keeps it
                r = replace(r, freed=done, freed_tick=ticks[done + 1] - 1, uses=tuple(sorted({*r.uses, *held})))
                tensors[i] = r
            if (r.freed is None or r.freed >= at) and at not in r.uses:
                tensors[i] = replace(r, uses=tuple(sorted((*r.uses, at))))
        key = f"{blk[0]}[{blk[1]}]:rerun"
        if key not in have and at + 1 < n:
            # Early stop (the runtime's checkpoint stops the re-run once it has re-made the last
            # tensor the block saved): what the forward makes after that is not made again.
            last = max((trace.tensors[i].created_tick for i in remade), default=ticks[a])
            transient = _forward_excess(trace.tensors, ticks[a], last + 1) - sum(tensors[i].size_bytes for i in remade)
            if transient > 0:
                extra.append((blk, at, transient))
    if not extra and all(a is b for a, b in zip(tensors, trace.tensors)):
        return trace
    if extra:
        # Double the clock: every interval then has a free tick after its point's and before the next one's.
        tensors = [replace(r, created_tick=_doubled(r.created_tick), freed_tick=_doubled(r.freed_tick))
                   for r in tensors]
        points_ = tuple(replace(p, tick=2 * p.tick) for p in trace.points)
        device = next((r.device for r in tensors), "cpu")
        for blk, at, transient in extra:
            it = trace.points[at].iteration
            tensors.append(TensorRecord(key=f"{blk[0]}[{blk[1]}]:rerun", category=Category.TEMPORARY,
                                        size_bytes=transient, dtype="uint8", device=device, iteration=it, created=at,
                                        freed=at, uses=(at,), created_tick=2 * ticks[at],
                                        freed_tick=2 * ticks[at] + 1))
        return replace(trace, points=points_, tensors=tuple(tensors))
    return replace(trace, tensors=tuple(tensors))


def _doubled(tick: Optional[int]) -> Optional[int]:
    """A tick on the doubled clock (None and the -1 of a pre-existing tensor stay as they are)."""
    return tick if tick is None or tick < 0 else 2 * tick


def saved_within(spans: Dict[Block, Tuple[int, int]], key: str, a: int, b: int) -> bool:
    """Whether the activation ``key`` was saved by a module call inside the span ``a .. b``
    (``spans``: :func:`forward_spans`). Where it was made does not matter: a block's output is
    made inside it and saved by the module after it."""
    saver = spans.get(block_of(key))
    return saver is not None and a <= saver[0] and saver[1] <= b


def _forward_excess(records, start_tick: int, end_tick: int) -> int:
    """The most bytes allocated between two ticks that were live at once before ``end_tick``."""
    events: List[Tuple[int, int]] = []
    for r in records:
        if start_tick <= r.created_tick < end_tick:
            events.append((r.created_tick, r.size_bytes))
            if r.freed_tick is not None and r.freed_tick < end_tick:
                events.append((r.freed_tick, -r.size_bytes))
    live = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1] < 0)):
        live += delta
        peak = max(peak, live)
    return peak
