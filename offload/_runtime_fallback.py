"""The online fallback: what the runtime does for the rest of an iteration that left the plan.

Note [divergence] in :mod:`offload._runtime_exec` says when an iteration leaves the plan; from
then on this policy runs at every point instead:

* **Demand paging** (Note [fault in]): a ``TorchDispatchMode`` sees every operation of the rest of
  the iteration on the training thread; an operation that reads or writes a storage the runtime
  holds away waits until it is back. That makes every tensor safe to evict at any point, saved
  activations included, whatever the changed forward does with them.
* **Eviction** (layer-aware LRU guided by the plan's next-use hints): when the device bytes it
  can see exceed the budget at a point, it evicts, furthest predicted next use first: the trace's
  next use of the same key counted from where the iteration is now (matched by point label; the
  succinct-predictions idea: one hint per request is enough), least recently used among equals,
  unknown keys (new control flow) counted as furthest. Candidates, within the runtime's
  ``movable`` categories: saved activations, parameters of modules not running (in forward),
  gradients, optimizer states.
* **Budget**: what it can see is, on CUDA, the allocator's figure; on CPU, parameters,
  gradients, optimizer states, inputs, every saved activation of the iteration and every storage
  allocated since the fallback started (the mode sees those allocations). When eviction cannot
  bring that under the budget it raises :class:`BudgetExceededError` with the budget and the
  bytes needed; it never exceeds a budget silently.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from profiling import _compat
from profiling._tensors import flat_tensors, storage_of
from profiling.trace import PointKind

if TYPE_CHECKING:
    from offload._runtime_exec import Executor

__all__ = ["BudgetExceededError", "Fallback"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
MIN_EVICT_BYTES = 64  # smaller storages cost more to track than they free


class BudgetExceededError(RuntimeError):
    """The runtime could not keep the device under its budget (it never exceeds one silently)."""


class _FaultIn(TorchDispatchMode):
    """Note [fault in]: bring a storage back before any operation touches it.

    Storages away have zero bytes (Note [storage swap]); an operation reading one would fail or,
    worse, read nothing. This mode looks up every tensor argument's storage in the residency
    table and waits for it first (a write still in flight is cancelled: the bytes never left).
    It also records the storages operations allocate, so the CPU budget sees them. The runtime's
    own copies (a transfer the training thread runs while waiting for it) pass straight through:
    they must never fault, count or evict (an error there would poison the transfer).
    """

    def __init__(self, fallback: "Fallback") -> None:
        super().__init__()
        self.fallback = fallback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105 (torch's protocol)
        if any(t not in _PLAIN for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        fb = self.fallback
        residency = fb.executor.residency
        if residency.transferring:  # the runtime's own copy, run while it waits: not the model's memory
            return func(*args, **kwargs)
        inputs = set()
        for t in flat_tensors(kwargs, flat_tensors(args, [])):
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            inputs.add(id(st))
            key = residency.key_of(st) if residency.entries else None
            if key is not None:
                residency.arrive(key)
                fb.faults += 1
                fb.executor.last_used[key] = fb.executor.clock
        out = func(*args, **kwargs)
        if not func.is_view:  # a view, or an in-place op's result, is no new memory
            outputs = set()
            for t in flat_tensors(out, []):
                st = storage_of(t)
                known = fb.allocated.get(id(st)) if st is not None else None
                # A dead storage's id may be recycled by this new one (StorageMap): compare identity.
                if st is not None and id(st) not in inputs and (known is None or known() is not st):
                    fb.allocated[id(st)] = weakref.ref(st)
                    fb.level += st.nbytes()
                    outputs.add(id(st))
            if fb.level > fb.executor.budget_bytes:
                # Over budget in the middle of an interval: act now, sparing this op's tensors.
                fb.evict(f"operation {func}", spare=inputs | outputs)
        return out


class Fallback:
    """The online policy of one diverged iteration (see the module docstring).

    Args:
        executor: The executor whose iteration diverged (its residency table, hooks and plan).
        thread: Ident of the thread running the iteration (the mode is entered only there).
    """

    def __init__(self, executor: "Executor", thread: int) -> None:
        self.executor = executor
        self.thread = thread
        self.allocated: Dict[int, Any] = {}  # id(storage) -> weakref, allocated since the mode started
        self.faults = 0
        self.evictions = 0
        self.evicted_bytes: Dict[str, int] = {}  # per category, bytes this fallback evicted
        self.level = 0  # tracked bytes at the last count plus what operations allocated since (an upper bound)
        self.settled_peak = 0  # the most tracked bytes left after the fallback acted
        self._mode: Optional[_FaultIn] = None

    # ---- the mode ---------------------------------------------------------------------------

    def start(self) -> None:
        """Enter the fault-in mode (at a point: never inside another mode's dispatch)."""
        # Note [no mode from backward]: the autograd engine sets its captured thread-local state
        # (the dispatch-mode stack included) around every node it runs, so a mode entered in a
        # backward hook is dropped again by the engine. A divergence found in backward is handled
        # at points only; the mode starts with the next iteration that diverges in forward.
        in_backward = torch._C._current_graph_task_id() != -1
        if self._mode is None and threading.get_ident() == self.thread and not in_backward:
            self._mode = _FaultIn(self)
            self._mode.__enter__()

    def stop(self) -> None:
        """Leave the mode (the iteration ended).

        Raises:
            RuntimeError: another dispatch mode was entered inside the iteration and is still active.
        """
        if self._mode is None:
            return
        stack = _compat.dispatch_mode_stack()
        if not any(m is self._mode for m in stack):  # already gone: Note [no mode from backward]
            self._mode = None
            return
        if stack[-1] is not self._mode:
            raise RuntimeError("a TorchDispatchMode entered inside the training step is still active at its end; "
                               "exit it inside the step")
        self._mode.__exit__(None, None, None)
        self._mode = None

    # ---- points -------------------------------------------------------------------------------

    def point(self, kind: PointKind, name: str) -> None:
        """Act at a point of the diverged iteration: bring back what is needed now, then evict."""
        ex = self.executor
        r = ex.residency
        self.start()
        if kind is PointKind.FORWARD_PRE:
            for pname in ex.module_params.get(name, ()):
                r.arrive(pname)  # about to run: fetch now rather than fault in op by op
                ex.last_used[pname] = ex.clock
        elif kind is PointKind.BACKWARD_END:
            r.arrive_all(keep=lambda k: not k.endswith(":grad"))  # clipping reads every gradient
        elif kind is PointKind.OPTIMIZER_PRE:
            r.arrive_all()
        elif kind is PointKind.GRAD_READY:
            ex.last_used[f"{name}:grad"] = ex.clock
        if kind is not PointKind.OPTIMIZER_PRE:
            self.evict(kind.value)

    def tracked_bytes(self) -> int:
        """Device bytes the fallback can see (see the module docstring)."""
        ex = self.executor
        if any(p.is_cuda for p in ex.params.values()):
            return int(torch.cuda.memory_allocated())
        storages: Dict[int, torch.UntypedStorage] = {}

        def add(t: Optional[torch.Tensor]) -> None:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                storages[id(st)] = st

        for p in ex.params.values():
            add(p)
            add(p.grad)
        if ex.optimizer is not None:
            for state in ex.optimizer.state.values():
                for v in state.values():
                    add(v)
        for t in ex.input_tensors:
            add(t)
        for sid, ref in list(self.allocated.items()):
            st = ref()
            if st is None:
                del self.allocated[sid]
            else:
                storages[sid] = st
        for ref, _ in ex.seen.values():
            st = ref()
            if st is not None:
                storages[id(st)] = st
        return sum(st.nbytes() for st in storages.values())

    def candidates(self, where: str, spare: FrozenSet[int] = frozenset()) -> List[Tuple[str, torch.UntypedStorage, str]]:
        """What may leave now: ``(key, storage, category)`` of resident tensors it can find again."""
        ex = self.executor
        r = ex.residency
        running = {pname for path, _ in ex.calls.stack for pname in ex.module_params.get(path, ())}
        in_backward = ex.graph_task != -1
        out: List[Tuple[str, torch.UntypedStorage, str]] = []
        movable = ex.movable

        def add(key: str, st: torch.UntypedStorage, category: str) -> None:
            if category in movable and id(st) not in spare and st.nbytes() >= MIN_EVICT_BYTES and r.state(key) is None \
                    and r.key_of(st) is None:
                out.append((key, st, category))

        for name, p in ex.params.items():
            if name not in running and not in_backward:
                add(name, p.untyped_storage(), "param")
            if p.grad is not None and where != PointKind.BACKWARD_END.value:
                add(f"{name}:grad", p.grad.untyped_storage(), "grad")
            state = ex.optimizer.state.get(p, {}) if ex.optimizer is not None else {}
            for sname, v in state.items():
                if isinstance(v, torch.Tensor):
                    add(f"{name}:{sname}", v.untyped_storage(), "optimizer_state")
        fixed = ex.fixed_storages
        for ref, key in ex.seen.values():
            st = ref()
            if st is not None and st not in fixed and st not in ex.inputs:
                add(key, st, "activation")
        return out

    def evict(self, where: str, spare: FrozenSet[int] = frozenset()) -> None:
        """Evict until the tracked bytes fit the budget, or raise BudgetExceededError.

        Args:
            where: The point kind, or the operation, after which it acts (for the error).
            spare: Storage ids not to evict (the operation that just ran reads or made them).
        """
        ex = self.executor
        used = self.level = self.tracked_bytes()
        ex.tracked_peak = max(ex.tracked_peak, used)
        if used <= ex.budget_bytes:
            self.settled_peak = max(self.settled_peak, used)
            return
        here = ex.here
        schedule = ex.schedule

        def order(item: Tuple[str, torch.UntypedStorage, str]) -> Tuple[int, int]:
            hint = schedule.next_use(item[0], here)
            return (-(hint if hint is not None else schedule.num_points), ex.last_used.get(item[0], 0))

        tier = self._tier()
        for key, storage, category in sorted(self.candidates(where, spare), key=order):
            if used <= ex.budget_bytes:
                break
            freed = ex.residency.evict_now(key, storage, tier)
            if freed:
                used -= freed
                self.evictions += 1
                self.evicted_bytes[category] = self.evicted_bytes.get(category, 0) + freed
        self.level = used
        self.settled_peak = max(self.settled_peak, used)
        if used > ex.budget_bytes:
            raise BudgetExceededError(
                f"device budget {ex.budget_bytes} bytes exceeded: this iteration diverged from the trace "
                f"({ex.reason}) and needs at least {used} bytes after {where} with nothing left to evict; "
                f"raise offload.device_budget_bytes/device_budget_fraction to at least {used} bytes, or make the "
                f"iteration static")

    def _tier(self) -> str:
        tiers = [d.tier for d in self.executor.plan.decisions if d.tier]
        return tiers[0] if tiers else "host"
