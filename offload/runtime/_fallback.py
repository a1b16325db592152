"""The online fallback: what the runtime does for the rest of an iteration that left the plan.

Note [divergence] in the plan executor says when an iteration leaves the plan; from then on this
policy runs at every point instead:

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
  bytes needed; it never exceeds a budget silently. (Not ``strict``: it evicts what it can and
  goes on; the reported peak shows what it could not.)
* **Evict at points** (Note [evict at points]): an iteration that leaves the plan inside an
  operation (a saved tensor of another size is found while the operation saves its inputs, before
  it computes) starts the mode there, so whatever is away faults in, but evicts nothing until the
  next point: the operation under way may read any candidate, and nothing spares its arguments.
* **Nothing all at once**: it never brings back more than the next operation needs. The
  optimizer step fetches the parameters, gradients and states of the parameter groups it is
  about to step (a sub-group, with :class:`~tierflow.offload.optim.SubgroupStepper`), and
  whatever else an operation reads faults in, so a state larger than the budget can be stepped.

The policy never sees the executor: it reads the iteration through the shared
:class:`~tierflow.offload.runtime._iteration.IterationState` (which the executor keeps current) and
the collaborators it is handed, so it can be built and tested without the executor's hooks.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from tierflow.offload.core.errors import TierFullError
from tierflow.offload.runtime._iteration import IterationState
from tierflow.offload.runtime._residency import Residency
from tierflow.offload.runtime._schedule import Schedule
from tierflow.profiling import flat_tensors, held_storage, is_fake_dispatch, storage_of, torch_compat
from tierflow.profiling.collectives import COLLECTIVE_NAMESPACES, hidden_buffer_bytes, hidden_buffer_ends
from tierflow.profiling.keys import StorageMap
from tierflow.profiling.trace import PointKind

__all__ = ["BudgetExceededError", "Fallback"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
MIN_EVICT_BYTES = 64  # smaller storages cost more to track than they free
#: Arguments an operation's remembered size may be keyed by (a tensor by its shape and dtype).
_PLAIN_ARGS = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
               torch.memory_format)
# Functional collectives: each is waited for by a wait_tensor operation this mode sees. (A c10d
# collective is waited for through its Work object, which no operation shows; FSDP2 runs its own on
# buffers of its own that the runtime never evicts.)
_COLLECTIVES = frozenset({"_c10d_functional"})
_WAIT = torch.ops._c10d_functional.wait_tensor.default
MAX_SIZED_OPS = 1 << 16  # operations remembered with their output size (Note [room before the operation])


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
        kwargs = kwargs or {}
        if is_fake_dispatch(types):  # Note [fake tensors pass]
            return func(*args, **kwargs)
        if any(t not in _PLAIN for t in types):
            return NotImplemented  # a tensor subclass (DTensor) desugars; its inner ops come back here
        fb = self.fallback
        residency = fb.residency
        if residency.transferring:  # the runtime's own copy, run while it waits: not the model's memory
            return func(*args, **kwargs)
        inputs = set()
        away: List[str] = []
        for t in flat_tensors(kwargs, flat_tensors(args, [])):
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            inputs.add(id(st))
            key = residency.key_of(st) if residency.entries else None
            if key is not None:
                away.append(key)
        if away:
            fb.faults += len(away)
            fb.bring(away, frozenset(inputs), f"operation {func}")
        if fb.hidden and not func.is_view:  # Note [hidden collective buffers]: gone once the output is read
            for sid in inputs:
                fb.hidden_gone(sid)
        hidden = hidden_buffer_bytes(func, args) if func.namespace in COLLECTIVE_NAMESPACES else 0
        if hidden and fb.level + hidden > fb.state.budget_bytes - fb.state.largest_op_bytes:
            fb.evict(f"operation {func}", spare=frozenset(inputs), incoming=hidden)
        if not func.is_view and fb.level + fb.state.largest_op_bytes >= fb.state.budget_bytes // 2:
            # Note [room before the operation]: near the budget, make room for what it will make.
            coming = _sized(fb.state.sized_ops, func, args, kwargs)
            if coming > fb.state.largest_op_bytes and fb.level + coming > fb.state.budget_bytes:
                fb.evict(f"operation {func}", spare=frozenset(inputs), incoming=coming)
        out = func(*args, **kwargs)
        if hidden:
            fb.hidden_made(hidden, hidden_buffer_ends(func, args, out))
        if func.namespace in _COLLECTIVES:
            # Note [collectives in flight]: a collective returns before the process group has read
            # its input and written its output (gloo works on its own thread; DTensor's
            # ``full_tensor`` waits only in a later ``wait_tensor``). Evicting either storage
            # meanwhile frees memory the transport still touches (it crashed the process: SIGSEGV).
            # They are spared until the wait on that output.
            made = {id(t.untyped_storage()) for t in flat_tensors(out, []) if t.device.type != "meta"}
            if func is _WAIT:
                for sid in inputs | made:
                    fb.in_flight.pop(sid, None)
            else:
                held = frozenset(inputs | made)
                for sid in made:
                    fb.in_flight[sid] = held
        if not func.is_view:  # a view, or an in-place op's result, is no new memory
            outputs, made = set(), 0
            for t in flat_tensors(out, []):
                st = storage_of(t)
                known = fb.allocated.get(id(st)) if st is not None else None
                # A dead storage's id may be recycled by this new one (StorageMap): compare identity.
                if st is not None and id(st) not in inputs and (known is None or known() is not st):
                    made += fb.track(st)
                    outputs.add(id(st))
            fb.level += made
            fb.state.tracked_peak = max(fb.state.tracked_peak, fb.level)  # Note [the level is live bytes]
            fb.state.largest_op_bytes = max(fb.state.largest_op_bytes, made)
            if fb.level > fb.state.budget_bytes - fb.state.largest_op_bytes:
                # Act now, in the middle of an interval, sparing this op's tensors: room for the
                # next operation's output too (Note [headroom]).
                fb.evict(f"operation {func}", spare=inputs | outputs)
        return out


def _output_bytes(func: Any, args: Any, kwargs: Any) -> int:
    """Bytes of new storage ``func`` will allocate for its outputs, found by running it on meta
    copies of its arguments (shapes only, no data, no random numbers drawn); 0 when that cannot
    tell (an operation whose output size depends on the data, or no meta kernel).

    Note [room before the operation]: an online policy otherwise learns an operation's output
    size only once it exists, so the first operation larger than any before (the logits, say)
    put the first step over its budget by that much. Asked before the operation runs, it makes
    room first. Only operations that may need it are asked (near the budget, an output larger
    than any seen): running one on meta costs about as much as dispatching it twice.
    """
    if func._schema.is_mutable:
        return 0  # in place or out=: writes storage that exists
    # Note [sizing draws nothing]: the sizing run must never run the operation for real. A factory
    # (``torch.randint(..., generator=g)``, ``torch.rand(n)``) has no tensor argument to move to
    # meta: run as it came, it drew its numbers from the generator, and the real call then drew
    # the next ones (found as a validation batch that changed under a budget). Factories go to meta
    # through their ``device``, a meta random kernel is given no generator, and an operation that
    # would still run on a real device is not sized.
    has_tensor = any(isinstance(x, torch.Tensor) for x in tree_flatten((args, kwargs))[0])
    if not has_tensor and "device" not in kwargs:
        return 0
    try:
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        if "device" in meta_kwargs:
            meta_kwargs["device"] = torch.device("meta")
        if torch.Tag.nondeterministic_seeded in func.tags:
            meta_kwargs.pop("generator", None)
        out = func(*meta_args, **meta_kwargs)
    except Exception:  # noqa: BLE001 (data-dependent shapes, ops without a meta kernel: not predictable)
        return 0
    # Outputs that view one buffer (FSDP2's all-gather input and output) are counted once.
    return sum({id(st): st.nbytes() for st in (t.untyped_storage() for t in flat_tensors(out, []))}.values())


def _sized(known: Dict[Any, int], func: Any, args: Any, kwargs: Any) -> int:
    """:func:`_output_bytes`, remembered per operation and argument shapes: sizing on meta costs
    about twice a small operation (150 us against 83 us for a 256x64 @ 64x256 matmul here), and
    every layer repeats the same calls."""
    leaves, _ = tree_flatten((args, kwargs))
    if not all(isinstance(x, _PLAIN_ARGS) for x in leaves):
        return _output_bytes(func, args, kwargs)  # a storage, say: never keep one alive in a key
    key = (func, tuple(kwargs), tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves))
    nbytes = known.get(key)
    if nbytes is None:
        if len(known) >= MAX_SIZED_OPS:  # shapes that never repeat (routing): start over
            known.clear()
        nbytes = known[key] = _output_bytes(func, args, kwargs)
    return nbytes


class Fallback:
    """The online policy of one diverged iteration (see the module docstring).

    Args:
        state: The diverged iteration's state (clock, current point, budget, saved tensors, ...).
        residency: The table that moves storages (faults bring them back, evictions send them away).
        schedule: The plan's schedule, for next-use hints.
        params: Parameter name -> parameter, as in ``model.named_parameters()``.
        optimizer: The optimizer whose states may be evicted, or None.
        module_params: Module path -> names of its direct parameters.
        fixed_storages: Storages of parameters and buffers (never evicted as activations).
        movable: Categories it may evict.
        tier: Name of the tier evictions go to.
        thread: Ident of the thread running the iteration (the mode is entered only there).
        strict: Raise :class:`BudgetExceededError` when eviction cannot meet the budget.
    """

    def __init__(self, state: IterationState, residency: Residency, schedule: Schedule, *,
                 params: Mapping[str, nn.Parameter], optimizer: Optional[torch.optim.Optimizer],
                 module_params: Mapping[str, Sequence[str]], fixed_storages: StorageMap, movable: FrozenSet[str],
                 tier: str, thread: int, strict: bool = True) -> None:
        self.state, self.residency, self.schedule = state, residency, schedule
        self.params, self.optimizer, self.module_params = params, optimizer, module_params
        self.fixed_storages, self.movable, self.tier = fixed_storages, movable, tier
        self.thread, self.strict = thread, strict
        self.name_of = {id(p): n for n, p in params.items()}
        self.allocated: Dict[int, Any] = {}  # id(storage) -> weakref, allocated since the mode started
        self._counted: Dict[int, int] = {}  # id(storage) -> its bytes in ``level`` (Note [the level is live bytes])
        self.faults = 0
        self.evictions = 0
        self.evicted_bytes: Dict[str, int] = {}  # per category, bytes this fallback evicted
        self.level = 0  # tracked bytes at the last count, plus what operations allocated since, minus what of that died
        self.settled_peak = 0  # the most tracked bytes left after the fallback acted
        self.evicting = True  # Note [evict at points]
        self.in_flight: Dict[int, FrozenSet[int]] = {}  # Note [collectives in flight]: output -> storages
        self.hidden: Dict[int, List[int]] = {}  # Note [hidden collective buffers]: id(output) -> [bytes], shared
        self._mode: Optional[_FaultIn] = None

    # ---- the mode ---------------------------------------------------------------------------

    def start(self, evict_now: bool = True) -> bool:
        """Enter the fault-in mode (never inside another mode's dispatch); True when it is active.

        Args:
            evict_now: False when called inside an operation: faults are served at once, evictions
                wait for the next point (Note [evict at points]).
        """
        self.evicting = self.evicting and evict_now
        # Note [no mode from backward]: the autograd engine sets its captured thread-local state
        # (the dispatch-mode stack included) around every node it runs, so a mode entered in a
        # backward hook is dropped again by the engine. A divergence found in backward is handled
        # at points only; the mode starts with the next iteration that diverges in forward.
        in_backward = torch._C._current_graph_task_id() != -1
        if self._mode is None and threading.get_ident() == self.thread and not in_backward:
            self._mode = _FaultIn(self)
            self._mode.__enter__()
        return self._mode is not None

    def stop(self) -> None:
        """Leave the mode (the iteration ended).

        Raises:
            RuntimeError: another dispatch mode was entered inside the iteration and is still active.
        """
        if self._mode is None:
            return
        stack = torch_compat.dispatch_mode_stack()
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
        """Act at a point of the diverged iteration: make room for what is needed now, bring it
        back, and keep the rest under the budget."""
        iteration = self.state
        self.evicting = True
        self.start()
        needed: List[Tuple[str, torch.Tensor]] = []
        if kind is PointKind.FORWARD_PRE:  # about to run: fetch now rather than fault in op by op
            needed = [(pname, self.params[pname]) for pname in self.module_params.get(name, ())]
        elif kind is PointKind.OPTIMIZER_PRE:
            needed = self._stepped()
            self.residency.forget_clean(key for key, _ in needed)  # the step writes them
        elif kind is PointKind.GRAD_READY:
            iteration.last_used[f"{name}:grad"] = iteration.clock
        self.bring([key for key, _ in needed], frozenset(id(held_storage(t)) for _, t in needed), kind.value)
        self.evict(kind.value, frozenset(id(held_storage(t)) for _, t in needed))

    def bring(self, keys: Sequence[str], spare: FrozenSet[int], where: str) -> None:
        """Bring ``keys`` back, making room for them first (Note [headroom]); ``spare``: storage
        ids not to evict for it (what the caller is about to use)."""
        r, iteration = self.residency, self.state
        incoming = sum(r.bytes_to_arrive(k) for k in keys)
        if incoming and self.level + incoming > iteration.budget_bytes - iteration.largest_op_bytes:
            self.evict(where, spare, incoming)
        for key in keys:
            r.arrive(key)
            iteration.last_used[key] = iteration.clock
        if incoming:
            self.level += incoming
            iteration.tracked_peak = max(iteration.tracked_peak, self.level)

    def _stepped(self) -> List[Tuple[str, torch.Tensor]]:
        """``(key, tensor)`` of what the optimizer is about to step: parameters, gradients and
        states of its parameter groups as they are now (one sub-group under SubgroupStepper)."""
        if self.optimizer is None:
            return []
        out: List[Tuple[str, torch.Tensor]] = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self.name_of.get(id(p))
                if name is None:
                    continue
                tensors = [(name, p), (f"{name}:grad", p.grad)]
                tensors += [(f"{name}:{s}", v) for s, v in self.optimizer.state.get(p, {}).items()]
                out += [(key, t) for key, t in tensors if isinstance(t, torch.Tensor)]
        return out

    def track(self, st: torch.UntypedStorage) -> int:
        """Count a storage an operation made; returns its bytes.

        Note [the level is live bytes]: the level between two counts is what the last count saw
        plus every storage operations made since, less those of them that died since (a weak
        reference's callback takes a storage's bytes off as it is freed). The step's peak is the
        level's high-water mark after every operation: a peak reached between two points (the
        temporaries of an optimizer's first step) is in it, and temporaries freed at once are not
        counted twice. (Counted only at points, the peak read 1% below the memory of a MoE's
        warm-up step.) What the last count saw and dies before the next is still counted: the
        figure never reads below the memory held.
        """
        sid, nbytes = id(st), st.nbytes()

        def gone(ref: Any, sid: int = sid) -> None:
            if self.allocated.get(sid) is ref:
                del self.allocated[sid]
                self.level -= self._counted.pop(sid, 0)

        self.allocated[sid] = weakref.ref(st, gone)
        self._counted[sid] = nbytes
        return nbytes

    def hidden_made(self, nbytes: int, ends: Sequence[torch.UntypedStorage]) -> None:
        """A collective holds ``nbytes`` out of sight until one of ``ends`` is read."""
        cell = [nbytes]
        for st in ends:
            self.hidden[id(st)] = cell
        self.level += nbytes
        self.state.tracked_peak = max(self.state.tracked_peak, self.level)

    def hidden_gone(self, sid: int) -> None:
        cell = self.hidden.pop(sid, None)
        if cell is not None:
            self.level -= cell[0]
            cell[0] = 0

    def tracked_bytes(self) -> int:
        """Device bytes the fallback can see (see the module docstring)."""
        iteration = self.state
        if any(p.is_cuda for p in self.params.values()):
            return int(torch.cuda.memory_allocated())
        storages: Dict[int, torch.UntypedStorage] = {}

        def add(t: Optional[torch.Tensor]) -> None:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = held_storage(t)
                storages[id(st)] = st

        for p in self.params.values():
            add(p)
            add(p.grad)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    add(v)
        for t in iteration.input_tensors:
            add(t)
        for sid, ref in list(self.allocated.items()):
            st = ref()
            if st is None:
                del self.allocated[sid]
                self._counted.pop(sid, None)
            else:
                storages[sid] = st
                self._counted[sid] = st.nbytes()  # what dies from now on takes off what it holds now
        for ref, _ in iteration.seen.values():
            st = ref()
            if st is not None:
                storages[id(st)] = st
        hidden = sum({id(cell): cell[0] for cell in self.hidden.values()}.values())
        return sum(st.nbytes() for st in storages.values()) + hidden

    def candidates(self, where: str, spare: FrozenSet[int] = frozenset()) -> List[Tuple[str, torch.UntypedStorage, str]]:
        """What may leave now: ``(key, storage, category)`` of resident tensors it can find again."""
        iteration, r = self.state, self.residency
        running = {pname for path in iteration.running_modules() for pname in self.module_params.get(path, ())}
        # In backward a parameter may go only while the fault-in mode runs there (it started before
        # backward: Note [no mode from backward]); it brings the parameter back for any use.
        in_backward = iteration.graph_task != -1 and self._mode is None
        out: List[Tuple[str, torch.UntypedStorage, str]] = []
        movable = self.movable

        def add(key: str, st: torch.UntypedStorage, category: str) -> None:
            if category in movable and id(st) not in spare and st.nbytes() >= MIN_EVICT_BYTES and r.state(key) is None \
                    and r.key_of(st) is None:
                out.append((key, st, category))

        for name, p in self.params.items():
            if name not in running and not in_backward:
                add(name, held_storage(p), "param")
            if p.grad is not None and where != PointKind.BACKWARD_END.value:
                add(f"{name}:grad", held_storage(p.grad), "grad")
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for sname, v in state.items():
                if isinstance(v, torch.Tensor):
                    add(f"{name}:{sname}", held_storage(v), "optimizer_state")
        fixed = self.fixed_storages
        for ref, key in iteration.seen.values():
            st = ref()
            if key is not None and st is not None and st not in fixed and st not in iteration.inputs:
                add(key, st, "activation")
        return out

    def evict(self, where: str, spare: FrozenSet[int] = frozenset(), incoming: int = 0) -> None:
        """Evict until the tracked bytes fit the budget, or raise BudgetExceededError.

        Args:
            where: The point kind, or the operation, after which it acts (for the error).
            spare: Storage ids not to evict (the operation that just ran reads or made them).
            incoming: Bytes about to come back (room is made for them too).
        """
        iteration = self.state
        used = self.level = self.tracked_bytes()
        iteration.tracked_peak = max(iteration.tracked_peak, used)
        if not self.evicting:  # Note [evict at points]: an operation under way may read any candidate
            return
        # Note [headroom]: an operation's output appears before anyone can evict for it, so the
        # policy keeps room for the largest output seen so far (learnt from the first iteration).
        target = max(iteration.budget_bytes - iteration.largest_op_bytes - incoming, 0)
        if used <= target:
            self.settled_peak = max(self.settled_peak, used)
            return
        here = iteration.here
        schedule = self.schedule

        def order(item: Tuple[str, torch.UntypedStorage, str]) -> Tuple[int, int]:
            hint = schedule.next_use(item[0], here)
            return (-(hint if hint is not None else schedule.num_points), iteration.last_used.get(item[0], 0))

        tier = self.tier
        if self.in_flight:  # Note [collectives in flight]
            spare = spare.union(*self.in_flight.values())
        for key, storage, category in sorted(self.candidates(where, spare), key=order):
            if used <= target:
                break
            try:
                freed = self.residency.evict_now(key, storage, tier)
            except TierFullError:
                if self.strict:
                    raise
                break  # a best-effort budget (not strict) keeps what the tier cannot take
            if freed:
                used -= freed
                self.evictions += 1
                self.evicted_bytes[category] = self.evicted_bytes.get(category, 0) + freed
        self.level = used
        self.settled_peak = max(self.settled_peak, used)
        if used + incoming > iteration.budget_bytes and self.strict:
            raise BudgetExceededError(
                f"device budget {iteration.budget_bytes} bytes exceeded: "
                + (f"this iteration diverged from the trace ({iteration.reason})" if iteration.reason else
                   "no plan exists yet (a warm-up or profiling step, or between steps)")
                + f" and needs at least {used + incoming} bytes after {where} with nothing left to evict; "
                f"raise offload.device_budget_bytes/device_budget_fraction to at least {used + incoming} bytes, or make the "
                f"iteration static")

