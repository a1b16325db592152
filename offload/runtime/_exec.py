"""The plan executor: hooks that find the trace's points on a live iteration and act on a plan there.

It emits the same points as :class:`~tierflow.profiling.LifetimeTracer` (module forward pre/post, backward
start/pre/post/end, gradient ready, optimizer pre/post) with the same labels, keys saved tensors
with the tracer's own numbering (:class:`tierflow.profiling.keys.ModuleCalls`), and at point ``p`` runs
the plan's actions for ``p`` in this order: start offloads, free what has left, start prefetches,
wait for what is due (Note [actions at a point]).

Note [actions at a point]: frees come before prefetches so a point's high-water mark is the
plan's; a prefetch is waited for at its deadline point, before the compute that uses the tensor,
and again (for saved tensors) when autograd unpacks it, so a tensor is never read while away.

Note [divergence]: a point whose label differs from the trace's, a saved tensor the trace does not
know (or of another size), or a planned tensor that is missing means this iteration is not the
traced one. For the rest of it the executor stops following the plan: saved tensors that are away
come back at once (a changed forward may read them), and the rest come back when needed
(a module's parameters at its forward, gradients before accumulation and at backward end,
everything at the optimizer step), any tensor an operation touches is brought back first, and
under the budget it evicts with the layer-aware LRU of :mod:`tierflow.offload.runtime._fallback`; when
nothing is left to evict it raises BudgetExceededError.

Note [saved tensors held weakly]: the executor finds a planned activation through a weak
reference to its storage; only autograd (and, while it is away, the residency entry) holds it.
A strong reference would keep a saved tensor alive past its last backward use, and a key with
several idle intervals would lose its storage if the reference were dropped at the first one.

Note [late offload]: a planned activation saved, or a gradient attached, after its evict point
(the trace saw it earlier) starts leaving the moment the runtime learns of it (pack hook,
gradient-ready hook); if its free point has passed it is freed at the next point (never inside
the hook: the operation saving it may still read it). Only a tensor still unseen at its prefetch
point counts as ``missed``: it stayed, and the accounted peak shows it.
"""

from __future__ import annotations

import sys
import threading
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook, saved_tensors_hooks

from tierflow.offload.plan.types import OffloadPlan
from tierflow.offload.runtime._account import SizeAccount
from tierflow.offload.runtime._fallback import BudgetExceededError, Fallback
from tierflow.offload.runtime._iteration import IterationState
from tierflow.offload.runtime._recompute import Reruns
from tierflow.offload.runtime._residency import Residency
from tierflow.offload.runtime._schedule import EMPTY_SCHEDULE, MOVABLE, Schedule, made_within
from tierflow.profiling import flat_tensors, held_storage, remove_hooks, torch_compat
from tierflow.profiling.keys import StorageMap, own_parameters
from tierflow.profiling.trace import ROOT_PATH, PointKind, point_label

__all__ = ["BudgetExceededError", "Executor"]


class Executor:
    """Installs hooks on ``model`` and ``optimizer`` and runs one iteration at a time under a plan.

    Note [online executor]: with no plan (before the first trace: warm-up and profiling steps,
    and between steps when the state does not fit) every iteration runs on the fallback policy
    from its first point: demand paging plus budgeted eviction. That keeps the budget from the
    very first step, and the profiling iterations are traced inside it (Note [tracing under a
    budget] in :mod:`tierflow.profiling.tracer`).

    Args:
        model: The module (its parameter names and module paths are the keys).
        optimizer: Its optimizer, or None.
        residency: The table that moves storages.
        plan: The plan; its swap decisions are indexed by ``schedule``. None: the online executor
            (Note [online executor]).
        schedule: From :func:`~tierflow.offload.runtime._schedule.make_schedule` (ignored without a plan).
        recompute: ``(module path, call)`` of blocks to run under activation checkpointing.
        skipped: Decision indices not executed (activations inside a recomputed block).
        budget_bytes: The device budget (fallback evictions keep tracked bytes under it).
        on_divergence: Called once per diverging iteration with the reason.
        movable: Categories the fallback may evict (the plan's own decisions already respect them).
        tier: Where the fallback evicts to (default: the plan's first tier, else ``host``).
        strict: Whether the fallback raises when it cannot meet the budget (False: it evicts what
            it can and the peak shows the rest; the runtime uses this while a budget given as a
            fraction of a peak not yet measured is only an estimate).
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], residency: Residency,
                 plan: Optional[OffloadPlan], schedule: Optional[Schedule], *, recompute: Set[Tuple[str, int]],
                 skipped: Set[int], budget_bytes: int, on_divergence: Callable[[str], None],
                 movable: FrozenSet[str] = MOVABLE, tier: Optional[str] = None, strict: bool = True) -> None:
        self.model, self.optimizer, self.residency = model, optimizer, residency
        self.online = plan is None
        self.plan, self.schedule = plan, schedule if plan is not None else EMPTY_SCHEDULE
        decisions = plan.decisions if plan is not None else ()
        self.tier = tier or next((d.tier for d in decisions if d.tier), "host")
        self.strict = strict
        self.skipped = skipped
        # What the fallback shares with this executor (Note [divergence]); reset by every iteration.
        self.state = IterationState(budget_bytes)
        self.on_divergence = on_divergence
        self.movable = movable
        self.planned_keys: Set[str] = {d.key for d in decisions}
        # What the plan keeps away when an iteration starts (everything else is resident then).
        self.away_at_start: Set[str] = {decisions[i].key for i in
                                        self.schedule.absent_at_start + self.schedule.writing_at_start}
        # What the plan leaves unused under the budget at its peak: saved tensors larger than
        # their reservation may use it without leaving the plan (Note [size reservations]).
        self.account = SizeAccount(self.schedule, max(plan.device_budget_bytes - plan.predicted_device_peak_bytes, 0)
                                   if plan is not None else 0)
        self.params: Dict[str, nn.Parameter] = dict(model.named_parameters())
        self.name_of = {id(p): n for n, p in self.params.items()}
        self.modules = {(path or ROOT_PATH): m for path, m in model.named_modules()}
        self.module_params = {path: [self.name_of[id(p)] for p in m._parameters.values()
                                     if p is not None and id(p) in self.name_of] for path, m in self.modules.items()}
        # Parameter storages -> the parameter's name, buffers' -> None; matched by identity, not by
        # id (ZeRO-3 frees parameter storages: see StorageMap). Parameters last, so they win.
        self.fixed_storages = StorageMap([(b.untyped_storage(), None) for b in model.buffers()]
                                         + [(held_storage(p), n) for n, p in self.params.items()])
        self._handles: List[Any] = []
        self.active = False
        self.reruns = Reruns(recompute, self.module_params, residency.arrive)
        self._in_pack = False
        self._install()

    # ---- hooks -----------------------------------------------------------------------------

    def _install(self) -> None:
        for path, module in self.model.named_modules():
            path = path or ROOT_PATH
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, k, path=path: self._forward_pre(m, path, a, k), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                lambda m, a, out, path=path: self._forward_post(path, out), always_call=True))
        for name, p in self.params.items():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda param, name=name: self._grad_ready(name)))
                self._handles.append(p.register_hook(lambda g, name=name: self._grad_arriving(name)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(lambda *_: self._optimizer(True)))
            self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self._optimizer(False)))

    def remove(self, restore: bool = True) -> None:
        """Remove every hook; bring every tensor back (unless ``restore`` is False)."""
        remove_hooks(self._handles)
        if restore:
            self.residency.arrive_all()

    # ---- one iteration ---------------------------------------------------------------------

    @contextmanager
    def iteration(self, inputs: Any = None, first: bool = False, saved_hooks: bool = True) -> Iterator[None]:
        """Run one iteration under the plan.

        Args:
            inputs: The iteration's input tensors.
            first: Enter the plan's steady state: bring back what the plan keeps resident at the
                start (a previous iteration's fallback, or the online executor, may have left it
                away) and evict what it keeps away.
            saved_hooks: False when someone else's saved-tensor hooks call :meth:`pack` and
                :meth:`unpack` (a tracer chained to them: ``saved_tensors_hooks`` pairs do not nest).
        """
        self.pos, self.diverged = 0, False
        self.state.begin(inputs)
        self.point_calls: Dict[Tuple[PointKind, str], int] = {}
        # Planned activations, held weakly: autograd alone decides when one dies (Note [saved tensors held weakly]).
        self.saved: Dict[str, "weakref.ref[torch.UntypedStorage]"] = {}
        self.hits = self.missed = 0
        self.fallback: Optional[Fallback] = None
        self.pending: Dict[str, int] = {}  # planned key -> decision waiting for its tensor (Note [late offload])
        self.late_release: List[str] = []
        self.account.begin()
        self.account.not_made = self.not_run = set()  # modules whose calls it skipped (Note [module calls not made])
        self._thread = threading.get_ident()
        self.active = True
        self.residency.drop_dead()
        if first and not self.online:  # the plan's steady state (Note [evict before entering], _residency)
            self._offload_at_start(self.schedule.absent_at_start, release=True)
            self.residency.arrive_all(keep=self.away_at_start.__contains__)
            self._offload_at_start(self.schedule.writing_at_start, release=False)
        self.residency.absent_min = self.residency.absent_bytes
        if self.online:
            self._diverge("")  # Note [online executor]: no plan to follow
        try:
            with saved_tensors_hooks(self.pack, self.unpack) if saved_hooks else nullcontext():
                self._point(PointKind.ITERATION_START, "iteration", 0)
                yield
            self._point(PointKind.ITERATION_END, "iteration", 0)
            if not self.diverged and self.pos != self.schedule.num_points:
                self._diverge(f"the iteration ended after {self.pos} of the trace's {self.schedule.num_points} points")
        finally:
            self.active = False
            self._close_interval()
            if self.fallback is not None:
                self.fallback.stop()
            # Saved activations still away: dead ones (their graph is gone) are dropped, one still
            # held (a graph kept for another backward) comes back (Note [absent is weak]).
            self.residency.arrive_all(keep=lambda k: not (k in self.schedule.activations or ":saved" in k))
            # After a divergence the rest stays where the fallback left it: the next planned
            # iteration starts with ``first`` and settles it (never all at once: it may not fit).
            self.state.end()
            self.saved.clear()
            self.reruns.clear()

    def _offload_at_start(self, indices: List[int], release: bool) -> None:
        """Start copying out the tensors of these decisions; with ``release``, free each once written."""
        for i in indices:
            d = self.plan.decisions[i]
            storage = self._storage(d.key, d.category)
            if storage is not None and self.residency.offload(d.key, storage, d.tier) and release:
                self.residency.release(d.key)

    # ---- points ----------------------------------------------------------------------------

    def _point(self, kind: PointKind, name: str, call: int) -> None:
        self.state.clock += 1
        if not self.diverged:
            label = point_label(kind, name, call)
            expected = self.schedule.labels[self.pos] if self.pos < self.schedule.num_points else "the end"
            while label != expected and self.pos in self.schedule.unobservable:
                # Note [unobservable graph tasks] (in _schedule): pass the empty graph task the trace has here.
                self._advance()
                self._advance()
                self._next_call(PointKind.BACKWARD_START, "backward")
                expected = self.schedule.labels[self.pos] if self.pos < self.schedule.num_points else "the end"
            skip = None if label == expected else self.schedule.calls_not_made(self.pos, label, self.not_run)
            if skip is not None:  # Note [module calls not made]
                self.not_run |= skip[1]
                while self.pos < skip[0]:
                    self._advance()
            if label == expected or skip is not None:
                self._advance()
                return
            self._diverge(f"point {label!r} where the trace had {expected!r}")
        else:
            label = point_label(kind, name, call)
        self.state.here = self.schedule.index_of.get(label, self.state.here)
        self.fallback.point(kind, name)

    def _advance(self) -> None:
        """The iteration reached the trace's point ``pos``: act there and start its interval."""
        self._close_interval()
        self.state.here = self.pos
        self._act(self.pos)
        self.residency.absent_min = self.residency.absent_bytes  # interval pos starts now
        self.pos += 1

    def _next_call(self, kind: PointKind, name: str) -> int:
        call = self.point_calls.get((kind, name), 0)
        self.point_calls[(kind, name)] = call + 1
        return call

    def _close_interval(self) -> None:
        """Account the interval that ends now: the fewest bytes held away during it."""
        if self.pos and not self.diverged and self.pos - 1 == len(self.account.absent_at):
            self.account.absent_at.append(self.residency.absent_min)

    def _act(self, p: int) -> None:
        s, r, decisions = self.schedule, self.residency, self.plan.decisions
        while self.late_release:
            r.release(self.late_release.pop())
        with r.batch():  # the small tensors of this point leave together (Note [packs])
            for i in s.evicts[p]:
                d = decisions[i]
                if i in self.skipped or (self.not_run and d.category in ("activation", "grad") and
                                         made_within(d.key, self.not_run)):
                    continue  # inside a recomputed block, or made by a call not made (Note [module calls not made])
                storage = self._storage(d.key, d.category)
                if storage is None and d.category in ("activation", "grad"):
                    if d.wraps:
                        self.missed += 1
                    else:
                        self.pending[d.key] = i  # Note [late offload]: not saved / not a .grad yet
                    continue
                if storage is None:
                    return self._diverge(f"planned tensor {d.key!r} does not exist at point {p}")
                if not self.account.fits(d.key, storage.nbytes(), d.size_bytes):  # Note [size reservations]
                    return self._diverge(f"planned tensor {d.key!r} has {storage.nbytes()} bytes, "
                                         f"the plan reserved {d.size_bytes}")
                self.hits += r.offload(d.key, storage, d.tier)
        for i in s.frees[p]:
            r.release(decisions[i].key)
        with r.batch():  # and those it prefetches come back together
            for i in s.prefetches[p]:
                if self.pending.pop(decisions[i].key, None) is not None:
                    self.missed += 1  # it never became available while it could leave: it stayed
                r.prefetch(decisions[i].key)
        for i in s.deadlines[p]:
            r.arrive(decisions[i].key)

    def _late_offload(self, key: str) -> None:
        """Start the offload of a planned tensor that appeared after its evict point (Note [late offload])."""
        i = self.pending.pop(key, None)
        if i is None or self.diverged:
            return
        d = self.plan.decisions[i]
        storage = self._storage(d.key, d.category)
        if storage is None or not self.account.fits(d.key, storage.nbytes(), d.size_bytes):
            self.missed += 1
            return
        if self.residency.offload(d.key, storage, d.tier):
            self.hits += 1
            if self.pos - 1 >= d.free_point:
                self.late_release.append(d.key)  # at the next point: the op saving it is still running

    def _storage(self, key: str, category: str) -> Optional[torch.UntypedStorage]:
        if category == "activation":
            ref = self.saved.get(key)
            return None if ref is None else ref()
        if category == "param":
            p = self.params.get(key)
            return None if p is None else held_storage(p)
        name, _, what = key.rpartition(":")
        p = self.params.get(name)
        if p is None:
            return None
        if category == "grad":
            return None if p.grad is None else held_storage(p.grad)
        value = self.optimizer.state.get(p, {}).get(what) if self.optimizer is not None else None
        return held_storage(value) if isinstance(value, torch.Tensor) else None

    # ---- module, grad and optimizer hooks ----------------------------------------------------

    def _forward_pre(self, module: nn.Module, path: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if not self.active or self.reruns.running:
            return
        self._check_backward_start()
        calls = self.state.calls
        call = calls.next_call(path)
        calls.enter(path, call)
        calls.note_parameters(own_parameters(self.modules.get(path)))  # Note [parameter storages]
        tensors = flat_tensors(args, [])
        if path == ROOT_PATH:
            for t in tensors:
                self.state.inputs.add(t.untyped_storage())
        needing_grad = [t for t in tensors if t.requires_grad]
        if needing_grad and torch.is_grad_enabled():
            self.state.grad_hooks.append(register_multi_grad_hook(
                needing_grad, lambda *_: self._backward_hook(PointKind.BACKWARD_POST, path, call), mode="all"))
        self._point(PointKind.FORWARD_PRE, path, call)
        if torch.is_grad_enabled() and self.reruns.enter(module, path, call, args, kwargs):
            self.account.checkpointed.add(f"{path}[{call}]")
            # Note [inputs of a re-run block]: traced, the block saved its inputs first and a later
            # module saving one again gave it no number; checkpointed, it saves nothing our hook
            # sees. Its inputs count as seen (no key: the checkpoint holds them, the plan never
            # moves them), so later modules number their tensors as traced.
            for t in flat_tensors(kwargs, list(tensors)):
                st = t.untyped_storage()
                if id(st) not in self.state.seen and st not in self.fixed_storages:
                    self.state.seen[id(st)] = (weakref.ref(st), None)

    def _forward_post(self, path: str, output: Any) -> None:
        if not self.active or self.reruns.running:
            return
        if sys.exc_info()[0] is not None:  # always_call: the forward raised; the iteration is over
            self.active = False
            return
        call = self.state.calls.exit(path)
        self.reruns.exit(path, call)
        needing_grad = [t for t in flat_tensors(output, []) if t.requires_grad]
        if needing_grad and torch.is_grad_enabled():
            self.state.grad_hooks.append(register_multi_grad_hook(
                needing_grad, lambda *_: self._backward_hook(PointKind.BACKWARD_PRE, path, call), mode="any"))
        self._point(PointKind.FORWARD_POST, path, call)

    def _backward_hook(self, kind: PointKind, path: str, call: int) -> None:
        if self.active:
            self._check_backward_start()
            self._point(kind, path, call)

    def _check_backward_start(self) -> None:
        gid = torch_compat.current_graph_task_id()
        if gid == -1 or gid == self.state.graph_task:
            return
        self.state.graph_task = gid
        call = self._next_call(PointKind.BACKWARD_START, "backward")
        torch_compat.queue_backward_callback(lambda: self._backward_end(call))
        self._point(PointKind.BACKWARD_START, "backward", call)

    def _backward_end(self, call: int) -> None:
        if not self.active:
            return
        self.state.graph_task = -1
        self._point(PointKind.BACKWARD_END, "backward", call)

    def _grad_arriving(self, name: str) -> None:
        if self.active:  # accumulation reads the old gradient
            if self.fallback is not None:
                self.fallback.bring([f"{name}:grad"], frozenset(), "gradient accumulation")
            else:
                self.residency.arrive(f"{name}:grad")

    def _grad_ready(self, name: str) -> None:
        if self.active:
            self._check_backward_start()
            self._point(PointKind.GRAD_READY, name, self._next_call(PointKind.GRAD_READY, name))
            if self.pending:
                self._late_offload(f"{name}:grad")

    def _optimizer(self, pre: bool) -> None:
        if not self.active:
            return
        name = type(self.optimizer).__name__
        kind = PointKind.OPTIMIZER_PRE if pre else PointKind.OPTIMIZER_POST
        if pre:  # the step writes its parameters, even through .data (Note [clean copies])
            self.residency.forget_clean(self.name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]
                                        if id(p) in self.name_of)
        self._point(kind, name, self._next_call(kind, name))

    # ---- saved tensors -----------------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> Any:
        """The executor's saved-tensor pack hook (keys the tensor; see :meth:`iteration`)."""
        if not self.active or t.device.type == "meta" or self.reruns.entering:
            return t, None
        st = t.untyped_storage()
        sid = id(st)
        if st in self.fixed_storages:
            return t, self.fixed_storages.get(st)  # a parameter (or a view of one): back before unpack
        calls, seen = self.state.calls, self.state.seen
        calls.note_parameters(own_parameters(self.modules.get(calls.owner()[0])))  # gathered late, too
        if st in self.state.inputs or not st.nbytes() or calls.is_parameter_storage(st):
            return t, None
        known = seen.get(sid)
        if known is not None and known[0]() is st:
            # Saved again: no new number (Note [saved-tensor keys]), but the same key, so this
            # unpack also waits for the storage to be back.
            return t, known[1]
        key = calls.next_saved_key()
        seen[sid] = (weakref.ref(st), key)
        self._in_pack = True
        try:
            return self._pack_saved(t, st, key)
        finally:
            self._in_pack = False

    def _pack_saved(self, t: torch.Tensor, st: torch.UntypedStorage, key: str) -> Any:
        reason = self.account.saved(key, st.nbytes(), following=not self.diverged)
        if self.diverged:
            return t, key  # the fallback may evict it (Note [divergence])
        if reason is not None:
            self._diverge(reason)
            return t, key
        if key in self.planned_keys:
            self.saved[key] = weakref.ref(st)
            if key in self.pending:
                self._late_offload(key)
        return t, key

    def unpack(self, packed: Any) -> torch.Tensor:
        """The executor's saved-tensor unpack hook (brings the tensor back first)."""
        t, key = packed
        if key is not None and self.active:
            self._check_backward_start()
            if self.fallback is not None:  # counted against the budget, with room made first
                self.fallback.bring([key], frozenset({id(t.untyped_storage())}), f"unpack of {key}")
            else:
                self.residency.arrive(key)
        return t

    @property
    def fallback_evictions(self) -> int:
        """Tensors the fallback evicted in this iteration (0 while it follows the plan)."""
        return 0 if self.fallback is None else self.fallback.evictions

    @property
    def reason(self) -> str:
        """Why this iteration diverged from the trace, empty while it follows it."""
        return self.state.reason

    @property
    def tracked_peak(self) -> int:
        """The most device bytes the fallback counted in this iteration (0 while it follows the plan)."""
        return self.state.tracked_peak

    # ---- divergence and the fallback ----------------------------------------------------------

    def _diverge(self, reason: str) -> None:
        if self.diverged:
            return
        self.diverged, self.state.reason = True, reason
        # Handed the shared state and lookups, not this executor, so the policy cannot come to
        # depend on the plan-following bookkeeping (pos, pending, saved), which is void from here.
        self.fallback = Fallback(self.state, self.residency, self.schedule, params=self.params,
                                 optimizer=self.optimizer, module_params=self.module_params,
                                 fixed_storages=self.fixed_storages, movable=self.movable, tier=self.tier,
                                 thread=self._thread, strict=self.strict)
        if not self.online:
            self.on_divergence(reason)
        # Note [divergence]: a changed forward may read saved tensors that are away. From here the
        # fault-in mode brings back whatever an operation reads; in backward every read of one is
        # an unpack, which brings it back with room made. Only where neither holds (another
        # thread) do they all come back at once. Found inside an operation (a saved tensor of
        # another size), the mode starts there but evicts only from the next point on: the
        # operation under way may read anything the policy would pick (Note [evict at points]).
        if self.fallback.start(evict_now=not self._in_pack) or torch_compat.current_graph_task_id() != -1:
            return
        for key in list(self.residency.entries):
            if key in self.saved or ":saved" in key:
                self.residency.arrive(key)
