"""The per-iteration state the plan executor and its fallback policy share.

The executor (:mod:`tierflow.offload.runtime._exec`) owns one :class:`IterationState` and updates it
as the iteration runs; the fallback (:mod:`tierflow.offload.runtime._fallback`) reads it to rank and
count what it may evict, and writes back only what it observes (last uses, the tracked peak). This
module sits below both so that neither has to know the other: the fallback never sees the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from tierflow.profiling import flat_tensors, remove_hooks
from tierflow.profiling.keys import ModuleCalls, StorageMap

__all__ = ["IterationState"]


@dataclass
class IterationState:
    """What one iteration has seen so far, shared by the executor and the fallback.

    One object lives as long as its executor and is reset in place by :meth:`begin`, so a
    fallback made in one iteration always sees the iteration that is running now.

    Attributes:
        budget_bytes: The device budget the fallback keeps the tracked bytes under.
        clock: Points passed in this iteration (the fallback's LRU clock).
        here: Index of the trace's point where the iteration is now (the fallback's next-use hints).
        graph_task: Id of the autograd graph task running now, -1 outside backward.
        tracked_peak: The most device bytes the fallback counted in this iteration.
        reason: Why this iteration diverged from the trace, empty while it follows it.
        last_used: Key -> ``clock`` of its last use, recorded once the iteration diverged.
        seen: ``id(storage) -> (weakref to it, key)`` of every saved tensor keyed this iteration
            (key None: an input of a re-run block, Note [inputs of a re-run block] in ``_exec``).
        input_tensors: The iteration's input tensors (they count against the budget on CPU).
        inputs: Storages of the inputs (and of the root module's arguments): never evicted.
        calls: The module-call stack and saved-tensor numbering of this iteration.
        largest_op_bytes: The most bytes one operation allocated, over every iteration so far
            (the fallback's headroom: Note [headroom] in ``_fallback``).
        sized_ops: Output bytes of operations sized before they ran, by operation and argument
            shapes, over every iteration so far (Note [room before the operation] in ``_fallback``).
        grad_hooks: Handles of this iteration's per-call multi-grad hooks (Note [hooks that keep
            a graph] in :mod:`tierflow.profiling._tensors`).
    """

    budget_bytes: int
    clock: int = 0
    here: int = 0
    graph_task: int = -1
    tracked_peak: int = 0
    reason: str = ""
    last_used: Dict[str, int] = field(default_factory=dict)
    seen: Dict[int, Tuple[Any, Optional[str]]] = field(default_factory=dict)
    input_tensors: List[torch.Tensor] = field(default_factory=list)
    inputs: StorageMap = field(default_factory=StorageMap)
    calls: ModuleCalls = field(default_factory=ModuleCalls)
    largest_op_bytes: int = 0
    sized_ops: Dict[Any, int] = field(default_factory=dict)
    grad_hooks: List[Any] = field(default_factory=list)

    def begin(self, inputs: Any) -> None:
        """Start a new iteration: forget the last one and record its inputs.

        Args:
            inputs: The iteration's inputs, any nesting of tensors (meta tensors are ignored).
        """
        self.reason = ""
        self.calls = ModuleCalls()
        self.graph_task = -1
        self.seen = {}
        self.input_tensors = [t for t in flat_tensors(inputs, []) if t.device.type != "meta"]
        self.inputs = StorageMap((t.untyped_storage(), None) for t in self.input_tensors)
        self.here = 0
        self.tracked_peak = 0
        self.last_used = {}
        self.clock = 0

    def end(self) -> None:
        """The iteration ended: drop what would keep its tensors (or their bookkeeping) alive."""
        self.input_tensors = []
        self.calls.reset()
        self.seen.clear()
        remove_hooks(self.grad_hooks)  # Note [hooks that keep a graph]

    def running_modules(self) -> List[str]:
        """Paths of the modules whose forward is running now, outermost first."""
        return [path for path, _ in self.calls.stack]
