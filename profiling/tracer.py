"""The tensor-lifetime tracer: watches real training iterations and produces a ``LifetimeTrace``.

Three kinds of instruments, all installed by :meth:`LifetimeTracer.attach` and all removed by
:meth:`LifetimeTracer.detach`:

* a ``TorchDispatchMode`` that sees every operation: which storages it reads or writes (uses) and
  which it allocates (births); a weak reference per storage records its free;
* hooks that produce the runtime points: module forward pre/post, module backward pre/post
  (multi-grad hooks on outputs and inputs, which leave the autograd graph unchanged), per-parameter
  post-accumulate-grad hooks, optimizer step pre/post hooks, and the start and end of each
  backward graph task;
* a ``saved_tensors_hooks`` pair that tells which storages autograd keeps for backward: those
  become activations, keyed by the module that saved them.

Only what happens inside :meth:`LifetimeTracer.iteration` blocks is recorded.

Example:
    >>> tracer = LifetimeTracer(model, optimizer)
    >>> with tracer:
    ...     for batch in batches:
    ...         with tracer.iteration():
    ...             tracer.mark_inputs(batch)
    ...             loss_fn(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
    >>> trace = tracer.trace()
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook, saved_tensors_hooks

from tierflow.profiling import torch_compat
from tierflow.profiling._table import RecordTable, ShrinkWatch, StepKeys, register_existing
from tierflow.profiling._tensors import (
    LIFT_OPS,
    DispatchRecorder,
    dispatch_round_trip_s,
    flat_tensors,
    held_storage,
    remove_hooks,
    storage_of,
)
from tierflow.profiling.collectives import COLLECTIVE_NAMESPACES, HiddenBuffers
from tierflow.profiling.keys import ModuleCalls, ParamNames, own_parameters
from tierflow.profiling.settings import MovingTensors, TracerConfig
from tierflow.profiling.trace import (
    ROOT_PATH,
    Category,
    LifetimeTrace,
    Phase,
    Point,
    PointKind,
    grad_key,
    input_key,
    point_label,
    state_key,
)

__all__ = ["LifetimeTracer", "MovingTensors", "TracerConfig"]

class LifetimeTracer:
    """Records tensor lifetimes and runtime points of a model and its optimizer.

    Args:
        model: Any ``nn.Module``; its parameter names and module paths become keys.
        optimizer: Any ``torch.optim.Optimizer`` stepping (some of) the model's parameters, or None.
        config: Measurement settings.
        saved_hooks: The ``(pack, unpack)`` pair the tracer's saved-tensor hooks call on to
            (default: the pair active when it attaches, if any).
        moving: The runtime moving tensors while they are traced (Note [tracing under a budget]).

    Raises:
        ValueError: ``model`` is not a module or ``optimizer`` not an optimizer.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 config: TracerConfig = TracerConfig(), *,
                 saved_hooks: Optional[Tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]] = None,
                 moving: Optional[MovingTensors] = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.config = model, optimizer, config
        self._chained, self._moving = saved_hooks, moving
        self._waited_s = 0.0  # moving.waited_s() at the last point
        self._table = RecordTable()
        self._points: List[Tuple] = []
        self._handles: List[Any] = []
        self._grad_handles: List[Any] = []  # per-call multi-grad hooks (die with their graph)
        self._mode: Optional[DispatchRecorder] = None
        self._saved_hooks: Optional[saved_tensors_hooks] = None
        self._attached = False
        self._detached = False
        self._name_of = ParamNames(model)
        self._modules: Dict[str, nn.Module] = {}  # module path -> the module (its own parameters)
        first = next(model.parameters(), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._sync = config.synchronize and self._device.type == "cuda"
        self._num_iterations = 0
        self._iteration: Optional[int] = None
        self._iteration_start = (-1, -1)  # (point, tick) of the current iteration's start
        self._shrink = ShrinkWatch()  # Note [storages that shrink]
        self._new_iteration_state()
        self._interval_start = 0.0
        self._overhead_s = 0.0  # our own bookkeeping since the last point (measured)
        self._num_ops = 0  # operations and saved-tensor packs since the last point
        self._per_op_s = 0.0  # what routing one of them through Python costs (calibrated)

    # ---- attach / detach -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> "LifetimeTracer":
        """Install every hook, the dispatch mode and the saved-tensor hooks; start the clock.

        Raises:
            RuntimeError: already attached, or attached before (a tracer traces once).
        """
        if self._attached or self._detached:
            raise RuntimeError("a LifetimeTracer attaches once; create a new one to trace again")
        if self.config.subtract_dispatch_cost:
            self._per_op_s = dispatch_round_trip_s()
        if self._moving is not None:
            self._waited_s = self._moving.waited_s()
        away = self._moving.away_bytes if self._moving is not None else None
        register_existing(self._table, self.model, self.optimizer, self._name_of, away_bytes=away)
        self._shrink.shrunk_before(torch_compat.fsdp2_gathered_tensors(self.model))  # Note [storages that shrink]
        for path, module in self.model.named_modules():
            path = path or ROOT_PATH
            self._modules[path] = module
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, path=path: self._forward_pre(path, a)))
            self._handles.append(module.register_forward_hook(
                lambda m, a, out, path=path: self._forward_post(path, out), always_call=True))
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda param, name=name: self._grad_ready(name, param)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(lambda *_: self._optimizer_pre()))
            self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self._optimizer_post()))
        outer = self._chained or torch_compat.outer_saved_tensors_hooks()
        self._outer_pack, self._outer_unpack = outer or (None, None)
        self._saved_hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        self._mode = DispatchRecorder(self._on_op)
        self._mode.__enter__()
        self._attached = True
        self._interval_start = time.perf_counter()
        return self

    def detach(self) -> None:
        """Remove everything :meth:`attach` installed; afterwards the tracer costs nothing.

        Raises:
            RuntimeError: another dispatch mode was entered after attaching and is still active
                (modes must be exited in reverse order).
        """
        if not self._attached:
            return
        stack = torch_compat.dispatch_mode_stack()
        if not stack or stack[-1] is not self._mode:
            raise RuntimeError("another TorchDispatchMode was entered after the tracer attached and is still "
                               "active; exit it before detaching the tracer")
        self._mode.__exit__(None, None, None)
        self._saved_hooks.__exit__(None, None, None)
        remove_hooks(self._handles)
        remove_hooks(self._grad_handles)
        self._table.close()
        self._mode = self._saved_hooks = None
        self._outer_pack = self._outer_unpack = None
        self._attached, self._detached = False, True

    def __enter__(self) -> "LifetimeTracer":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ---- what the user calls ---------------------------------------------------------------

    @contextmanager
    def iteration(self) -> Iterator[int]:
        """Record one training iteration; yields its 0-based index.

        Raises:
            RuntimeError: the tracer is not attached, or iterations are nested.
        """
        if not self._attached:
            raise RuntimeError("attach the tracer before tracing an iteration: `with tracer: ...`")
        if self._iteration is not None:
            raise RuntimeError("tracer.iteration() blocks cannot be nested")
        self._iteration = self._num_iterations
        self._new_iteration_state()
        self._emit(PointKind.ITERATION_START, "iteration", 0, Phase.OTHER)
        self._iteration_start = (self._table.point, self._points[-1][-1])
        try:
            yield self._iteration
        finally:
            self._hidden.end_all()  # the iteration's collectives are all waited for by its end
            self._table.hold(self._held)
            remove_hooks(self._grad_handles)  # Note [hooks that keep a graph]
            self._emit(PointKind.ITERATION_END, "iteration", 0, Phase.OTHER)
            self._module_calls.reset()  # drops its weak references to parameter storages
            self._iteration = None
            self._num_iterations += 1

    def mark_inputs(self, *tensors: Any) -> None:
        """Declare tensors (or nested lists/tuples of them) as this iteration's inputs.

        Inputs get keys ``input0``, ``input1``, ... in the order marked; tensors the model's
        forward receives are marked automatically after these.

        Raises:
            RuntimeError: called outside :meth:`iteration`.
        """
        if self._iteration is None:
            raise RuntimeError("mark_inputs() must be called inside `with tracer.iteration():`")
        for t in flat_tensors(tensors, []):
            self._mark_input(t)

    def trace(self) -> LifetimeTrace:
        """The trace of every iteration recorded so far.

        Raises:
            ValueError: no iteration was traced.
            RuntimeError: called inside an iteration block.
        """
        if self._iteration is not None:
            raise RuntimeError("trace() was called inside `with tracer.iteration():`; call it after the block")
        if self._num_iterations == 0:
            raise ValueError("no iteration was traced; run each training step inside `with tracer.iteration():`")
        points = tuple(Point(*p) for p in self._points)
        return LifetimeTrace(points=points, tensors=self._table.records(), num_iterations=self._num_iterations,
                             model=type(self.model).__name__, device=str(self._device),
                             optimizer=type(self.optimizer).__name__ if self.optimizer is not None else "")

    # ---- points and timing -----------------------------------------------------------------

    def _new_iteration_state(self) -> None:
        self._calls: Dict[Tuple[PointKind, str], int] = defaultdict(int)
        self._module_calls = ModuleCalls()  # the stack and saved-tensor numbering (shared with the runtime)
        self._keys: set = set()
        self._num_inputs = 0
        self._external_rows: set = set()
        self._held: List[int] = []  # Note [what the optimizer holds]
        self._in_step, self._step_keys = False, StepKeys()
        self._graph_task = -1
        self._tmp_label, self._tmp_count, self._ext_count = "", 0, 0
        self._hidden = HiddenBuffers(self._table)

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize(self._device)  # the wait is device compute: it belongs to the interval
        return time.perf_counter()

    def _next_call(self, kind: PointKind, name: str) -> int:
        call = self._calls[(kind, name)]
        self._calls[(kind, name)] = call + 1
        return call

    def _emit(self, kind: PointKind, name: str, call: int, phase: Phase, entered: Optional[float] = None) -> None:
        if self._shrink:  # Note [storages that shrink]
            away = self._moving.away_bytes if self._moving is not None else None
            self._external_rows.difference_update(self._shrink.release_empty(self._table, away))
        now = self._now() if entered is None else entered
        waited = 0.0
        if self._moving is not None:  # Note [tracing under a budget]
            total = self._moving.waited_s()
            waited, self._waited_s = total - self._waited_s, total
        compute_s = max(now - self._interval_start - self._overhead_s - self._num_ops * self._per_op_s - waited, 0.0)
        tick = self._table.next_tick()
        self._points.append((kind, name, call, self._iteration, phase, compute_s, tick))
        self._table.point = len(self._points) - 1
        self._tmp_label, self._tmp_count, self._ext_count = point_label(kind, name, call), 0, 0
        self._overhead_s, self._num_ops = 0.0, 0
        self._interval_start = time.perf_counter()

    def _phase(self) -> Phase:
        return Phase.BACKWARD if torch_compat.current_graph_task_id() != -1 else Phase.FORWARD

    def _check_backward_start(self) -> None:
        """Emit BACKWARD_START at the first event of a new autograd graph task."""
        gid = torch_compat.current_graph_task_id()
        if gid == -1 or gid == self._graph_task:
            return
        self._graph_task = gid
        call = self._next_call(PointKind.BACKWARD_START, "backward")
        torch_compat.queue_backward_callback(lambda: self._backward_end(call))
        self._emit(PointKind.BACKWARD_START, "backward", call, Phase.BACKWARD)

    def _backward_end(self, call: int) -> None:
        if self._iteration is None or not self._attached:
            return
        self._graph_task = -1
        self._emit(PointKind.BACKWARD_END, "backward", call, Phase.OTHER)

    # ---- hooks -------------------------------------------------------------------------------

    def _forward_pre(self, path: str, args: Tuple[Any, ...]) -> None:
        if self._iteration is None:
            return
        self._check_backward_start()  # activation-checkpoint recomputation runs inside backward
        entered = self._now()
        call = self._next_call(PointKind.FORWARD_PRE, path)
        self._module_calls.enter(path, call)
        self._module_calls.note_parameters(own_parameters(self._modules.get(path)))  # Note [parameter storages]
        tensors = flat_tensors(args, [])
        if path == ROOT_PATH:
            for t in tensors:
                self._mark_input(t)
        needing_grad = [t for t in tensors if t.requires_grad]
        if needing_grad and torch.is_grad_enabled():
            self._grad_handles.append(register_multi_grad_hook(
                needing_grad, lambda *_: self._backward_hook(PointKind.BACKWARD_POST, path, call), mode="all"))
        self._emit(PointKind.FORWARD_PRE, path, call, self._phase(), entered)

    def _forward_post(self, path: str, output: Any) -> None:
        if self._iteration is None:
            return
        entered = self._now()
        # Pops our frame even if an inner module raised and skipped its own post hook.
        call = self._module_calls.exit(path)
        needing_grad = [t for t in flat_tensors(output, []) if t.requires_grad]
        if needing_grad and torch.is_grad_enabled():
            self._grad_handles.append(register_multi_grad_hook(
                needing_grad, lambda *_: self._backward_hook(PointKind.BACKWARD_PRE, path, call), mode="any"))
        self._emit(PointKind.FORWARD_POST, path, call, self._phase(), entered)

    def _backward_hook(self, kind: PointKind, path: str, call: int) -> None:
        if self._iteration is None or not self._attached:
            return
        self._check_backward_start()
        entered = self._now()
        self._emit(kind, path, call, Phase.BACKWARD, entered)

    def _grad_ready(self, name: str, param: nn.Parameter) -> None:
        if self._iteration is None:
            return
        self._check_backward_start()
        entered = self._now()
        if param.grad is not None:
            self._claim(param.grad, Category.GRAD, grad_key(name))
        self._emit(PointKind.GRAD_READY, name, self._next_call(PointKind.GRAD_READY, name), Phase.BACKWARD, entered)

    def _optimizer_pre(self) -> None:
        if self._iteration is None:
            return
        name = type(self.optimizer).__name__
        self._emit(PointKind.OPTIMIZER_PRE, name, self._next_call(PointKind.OPTIMIZER_PRE, name), Phase.OPTIMIZER)
        self._in_step = True

    def _optimizer_post(self) -> None:
        if self._iteration is None:
            return
        entered, self._in_step = self._now(), False
        for param, state in self.optimizer.state.items():
            for state_name, value in state.items():
                if isinstance(value, torch.Tensor):
                    self._claim(value, Category.OPTIMIZER_STATE, state_key(self._name_of(param), state_name))
        name = type(self.optimizer).__name__
        self._emit(PointKind.OPTIMIZER_POST, name, self._next_call(PointKind.OPTIMIZER_POST, name), Phase.OTHER,
                   entered)

    def _pack(self, t: torch.Tensor) -> Any:
        if self._iteration is not None:
            start = time.perf_counter()
            self._num_ops += 1
            st = storage_of(t)
            if st is not None:
                row = self._row_or_external(st, t)
                calls = self._module_calls
                calls.note_parameters(own_parameters(self._modules.get(calls.owner()[0])))  # gathered late, too
                if self._table.category[row] is Category.TEMPORARY and not calls.is_parameter_storage(st):
                    key = self._module_calls.next_saved_key()  # Note [saved-tensor keys]
                    self._table.reclassify(row, Category.ACTIVATION, self._unique(key))
            self._overhead_s += time.perf_counter() - start
        return self._outer_pack(t) if self._outer_pack is not None else t

    def _unpack(self, packed: Any) -> torch.Tensor:
        return self._outer_unpack(packed) if self._outer_unpack is not None else packed

    # ---- the dispatch hot path ---------------------------------------------------------------

    def _on_op(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if self._iteration is None or (self._moving is not None and self._moving.busy()):
            return func(*args, **kwargs)
        self._check_backward_start()
        start = time.perf_counter()
        self._num_ops += 1
        table = self._table
        lift = func in LIFT_OPS
        inputs = flat_tensors(kwargs, flat_tensors(args, []))
        if not lift:
            # Views only re-describe memory; they are not uses of it (and would hide idle time).
            counts_as_use = not func.is_view
            for t in inputs:
                st = storage_of(t)
                if st is not None:
                    row = self._row_or_external(st, t)
                    if counts_as_use:
                        table.use(row)
                    if self._hidden.rows and counts_as_use:
                        self._hidden.used(st)
        self._overhead_s += time.perf_counter() - start
        out = func(*args, **kwargs)
        start = time.perf_counter()
        if func.namespace in COLLECTIVE_NAMESPACES:  # Note [hidden collective buffers]
            self._hidden.made(func, args, out, lambda: self._tmp_key("collective"), self._iteration)
        for t in flat_tensors(out, []):
            st = storage_of(t)
            if st is not None and table.row_of(st) is None:
                key = self._step_keys(self._tmp_label, st, t) if self._in_step else self._tmp_key("tmp")
                table.add(st, t, Category.TEMPORARY, key, iteration=self._iteration, created=table.point,
                          created_tick=table.next_tick())
        self._overhead_s += time.perf_counter() - start
        return out

    # ---- classification ------------------------------------------------------------------------

    def _tmp_key(self, kind: str) -> str:
        key = self._unique(f"{self._tmp_label}:{kind}{self._tmp_count}")
        self._tmp_count += 1
        return key

    def _unique(self, key: str) -> str:
        """``key``, suffixed ``#2``, ``#3``... when already used in this iteration."""
        if key in self._keys:
            n = 2
            while f"{key}#{n}" in self._keys:
                n += 1
            key = f"{key}#{n}"
        self._keys.add(key)
        return key

    def _row_or_external(self, st: torch.UntypedStorage, t: torch.Tensor) -> int:
        """The storage's row; a storage first seen now existed at the start of this iteration
        (made by the data pipeline, or before tracing), except in backward (Note [allocations no
        operation shows] in :mod:`tierflow.profiling._table`) and in the optimizer step (Note [what
        the optimizer holds])."""
        table = self._table
        row = table.row_of(st)
        regrown = row is None and self._shrink.regrown(st)
        if row is None and (regrown or torch_compat.current_graph_task_id() != -1):
            # Regrown (Note [storages that shrink]), or first seen in backward (Note [allocations
            # no operation shows]): allocated now.
            kind = "regrown" if regrown else "unseen"
            key = self._tmp_key(kind)
            row = table.add(st, t, Category.TEMPORARY, key, iteration=self._iteration, created=table.point,
                            created_tick=table.next_tick())
            self._shrink.watch(row, st)
        elif row is None:
            point, tick = self._iteration_start
            key = f"{self._tmp_label}:external{self._ext_count}"  # its own count: no temporary's key shifts
            self._ext_count += 1
            row = table.add(st, t, Category.INPUT, key, iteration=self._iteration, created=point,
                            created_tick=tick)
            self._external_rows.add(row)
            self._shrink.watch(row, st)
            if self._in_step:
                self._held.append(row)
        return row

    def _mark_input(self, t: torch.Tensor) -> None:
        st = storage_of(t)
        if st is None:
            return
        row = self._row_or_external(st, t)
        if self._table.category[row] is Category.TEMPORARY or row in self._external_rows:
            self._external_rows.discard(row)
            self._table.reclassify(row, Category.INPUT, self._unique(input_key(self._num_inputs)))
            self._num_inputs += 1

    def _claim(self, t: torch.Tensor, category: Category, key: str) -> None:
        """Give a temporary (or unknown) storage its owner's category and key."""
        st = storage_of(t)
        if st is None and t.device.type != "meta":
            # Already sent away by the runtime tracing under a budget (its gradient-ready hook runs
            # before ours): the row made when it was allocated is still this tensor's.
            held = held_storage(t)
            st = held if self._table.row_of(held) is not None else None
        if st is None:
            return
        row = self._table.row_of(st)
        if row is None:
            point, tick = self._iteration_start
            self._table.add(st, t, category, self._unique(key), iteration=self._iteration, created=point,
                            created_tick=tick)
        elif self._table.category[row] is Category.TEMPORARY:
            self._table.reclassify(row, category, self._unique(key))
