"""The tiered optimizer's step pipeline: where each sub-group's state lives and how a step moves it.

A step has two phases (Note [atomic step]):

1. **Copy phase** (can fail): sub-groups whose state is on a tier that does I/O (``nvme``,
   ``numa``), and every sub-group whose state does not exist yet, are streamed: read into a
   staging buffer ``num_buffers - 2`` sub-groups ahead, updated there, written to a *fresh* slot
   while the next ones compute. Their new parameters wait aside (Note [parameters set aside] in
   ``offload/optim/_update.py``). If a reservation, read or write fails, the fresh slots are freed
   and the proxies dropped: nothing committed was touched.
2. **In-place phase** (no I/O, cannot fail on a tier): once every write of phase 1 is durable
   and committed, sub-groups whose state sits in host memory (the ``host`` tier's slots, and
   ``resident`` state) are updated directly in that memory (Note [in-place update]).

Note [in-place update]: the update of a host-tier or resident sub-group takes its state as views
straight into the slot's memory: no read, no write-back, no second copy of the state, and no
undo copy of its parameters. It is safe because it runs after everything that can fail. The one
exception is an optimizer that adds a state entry after its first step (a new layout needs a new
slot): if the tier has no room for it then, the error says the step was partly applied.

Note [staging cache]: staging buffers keep the last copy-phase sub-groups' committed state after a
step. With the alternating order (``offload/optim/placement.py``) the next step starts with exactly
those, so their reads are skipped.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Deque, Dict, Hashable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from tierflow.offload.core.errors import TierError, TierFullError
from tierflow.offload.optim._state import StagingBuffer, StateLayout, layout_of, pack, unpack
from tierflow.offload.optim._update import SubgroupUpdater, grad_mark
from tierflow.offload.optim.placement import PathSpec, SubGroup, choose_path
from tierflow.offload.tiers._pool import PooledTier
from tierflow.offload.tiers.base import Slot, Tier, TransferHandle

__all__ = ["RESIDENT", "StepPipeline", "StepRun"]

RESIDENT = "resident"
IN_PLACE_TIERS = ("host",)  # tiers whose slots are local host memory the update may touch directly
Gate = Callable[[int], None]
_NO_BYTES = torch.empty(0, dtype=torch.uint8)  # the buffer of a sub-group whose state is scalars only


class _Record:
    """Where one sub-group's state lives (the owner's residency table, never on torch objects)."""

    __slots__ = ("layout", "small", "path", "slot", "version", "memory")

    def __init__(self) -> None:
        self.layout: Optional[StateLayout] = None  # None until the optimizer created state
        self.small: List[Dict[str, Any]] = []  # per parameter, the non-tiered values
        self.path: Optional[str] = None  # tier kind, or RESIDENT
        self.slot: Optional[Slot] = None
        self.version = 0
        self.memory: Optional[StagingBuffer] = None  # RESIDENT only: the state's own local buffer


class StepRun:
    """What one step's copy phase changed so far: enough to commit it or to undo it."""

    def __init__(self) -> None:
        self.pending: Dict[int, Tuple[StateLayout, List[Dict[str, Any]], Optional[str], Optional[Slot],
                                      Optional[StagingBuffer]]] = {}
        self.new_params: Dict[int, List[torch.Tensor]] = {}
        self.writes: List[Tuple[int, TransferHandle]] = []
        # id(buffer) -> (buffer, the last sub-group packed into it, None when that one went to host memory)
        self.packed: Dict[int, Tuple[StagingBuffer, Optional[int]]] = {}
        self.assigned: Dict[int, StagingBuffer] = {}  # buffers of the prefetch window, not yet updated
        self.claimed: Dict[str, int] = collections.defaultdict(int)  # bytes newly placed on each path
        self.grads: Dict[int, List[Tuple[Optional[torch.Tensor], Hashable]]] = {}  # gradients each update read


class StepPipeline:
    """Owns the residency table, the staging buffers and the I/O of every step.

    Args:
        updater: runs the wrapped optimizer on one sub-group.
        tiers: tier kind -> tier.
        paths: the paths state is striped over, with bandwidth and capacity.
        resident_bytes: state bytes kept in local DRAM (``resident``).
        num_buffers, max_inflight_per_path: see :class:`~tierflow.offload.TieredOptimizerConfig`.
        bind: ``bind(address, nbytes)`` for staging buffers and resident state (local NUMA node).
        config_key: the config key named in errors.
    """

    def __init__(self, updater: SubgroupUpdater, tiers: Mapping[str, Tier], paths: Sequence[PathSpec], *,
                 resident_bytes: int, num_buffers: int, max_inflight_per_path: int,
                 bind: Optional[Callable[[int, int], None]] = None, config_key: str = "optimizer.tiered") -> None:
        self.updater = updater
        self.subgroups: Tuple[SubGroup, ...] = updater.subgroups
        self.tiers = dict(tiers)
        self.paths = list(paths)
        self.resident_bytes = resident_bytes
        self.max_inflight_per_path = max_inflight_per_path
        self.bind = bind
        self.key = config_key
        self.records = [_Record() for _ in self.subgroups]
        self.buffers = [StagingBuffer(bind) for _ in range(num_buffers)]
        self.path_bytes: Dict[str, int] = {p.name: 0 for p in self.paths}
        self.resident_used = 0
        self._inflight: Dict[str, Deque[TransferHandle]] = {p.name: collections.deque() for p in self.paths}
        self._clock = 0
        self.counters: Dict[str, Any] = {"reads": 0, "cache_hits": 0, "writes": 0, "bytes_read": 0,
                                         "bytes_written": 0, "in_place_updates": 0, "early_updates": 0,
                                         "read_wait_s": 0.0, "drain_s": 0.0}

    # --- which phase ------------------------------------------------------------------------------

    def in_place(self, i: int, *, copy_all: bool = False) -> bool:
        """True when sub-group ``i`` is updated in place (phase 2); ``copy_all`` keeps only resident there."""
        rec = self.records[i]
        if rec.layout is None or not rec.layout.entries:
            return False
        return rec.path == RESIDENT or (not copy_all and rec.path in IN_PLACE_TIERS)

    # --- phase 1: stream ---------------------------------------------------------------------------

    def stream(self, run: StepRun, order: Sequence[int], where: Optional[Sequence[str]], *, aside: bool,
               depth: int, gate: Optional[Gate] = None) -> None:
        """Update ``order`` with reads ``depth`` sub-groups ahead and writes draining behind.

        ``gate(i)``, when given, blocks until sub-group ``i``'s gradients are final
        (``overlap_backward``); the gradients each update read are recorded in ``run.grads``.
        """
        order = list(order)
        reads: Dict[int, Optional[TransferHandle]] = {}
        for pos, i in enumerate(order):
            window = order[pos:pos + 1 + depth]
            for j in window:
                if j not in run.assigned:
                    reads[j] = self._prefetch(run, j, window)
            handle = reads.pop(i)
            if handle is not None:
                t0 = time.perf_counter()
                handle.wait()
                self.counters["read_wait_s"] += time.perf_counter() - t0
            for _, h in run.writes:  # stop early when a write already failed
                if h.done() and h.exception() is not None:
                    h.wait()
            if gate is not None:
                gate(i)
                run.grads[i] = [(p.grad, grad_mark(p.grad) if p.grad is not None else 0)
                                for p in self.updater.sub_params(i)]
            self._update_copy(run, i, where, aside)

    def _prefetch(self, run: StepRun, i: int, window: List[int]) -> Optional[TransferHandle]:
        rec = self.records[i]
        for buf in self.buffers:
            if rec.layout is not None and buf.tag == (i, rec.version):
                run.assigned[i] = buf
                self.counters["cache_hits"] += 1
                return None
        protected = {(j, self.records[j].version) for j in window}
        taken = {id(b) for b in run.assigned.values()} | {id(b) for b in self.buffers if b.tag in protected}
        buf = self.take_buffer(taken)
        run.assigned[i] = buf
        if rec.layout is None or rec.slot is None:
            return None
        dst = buf.ensure(rec.layout.nbytes)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += rec.layout.nbytes
        if rec.path in IN_PLACE_TIERS:  # copy-on-write of host memory (overlap_backward): a memcpy
            dst.copy_(self._slot_memory(rec.path, rec.slot))
            return None
        return self._limited(rec.path, lambda: self.tiers[rec.path].read(rec.slot, dst))

    def take_buffer(self, taken: Set[int]) -> StagingBuffer:
        """The least recently used staging buffer not in ``taken`` (ids), its transfers finished."""
        free = [b for b in self.buffers if id(b) not in taken]
        if not free:
            raise AssertionError("no staging buffer free: num_buffers must exceed the prefetch window")
        buf = min(free, key=lambda b: b.last_used)
        buf.wait()
        buf.tag = None
        self._clock += 1
        buf.last_used = self._clock
        return buf

    def _update_copy(self, run: StepRun, i: int, where: Optional[Sequence[str]], aside: bool) -> None:
        rec, n = self.records[i], len(self.subgroups[i].param_ids)
        buf = run.assigned.pop(i)
        if rec.layout is None:
            states: List[Dict[str, Any]] = [{} for _ in range(n)]
        else:
            memory = _NO_BYTES if rec.slot is None else buf.tensor[:rec.layout.nbytes]
            states = unpack(rec.layout, memory, _clone_small(rec.small))
        new_states, new_params = self.updater.update(i, states, where=where[i] if where else None, aside=aside,
                                                     state_bytes=rec.layout.nbytes if rec.layout else 0)
        if new_params is not None:
            run.new_params[i] = new_params
        self.store(run, i, new_states, buf)

    def store(self, run: StepRun, i: int, states: List[Dict[str, Any]], buf: StagingBuffer) -> None:
        """Pack ``states`` into ``buf`` and write it to a fresh slot (or a fresh resident buffer)."""
        rec = self.records[i]
        layout = layout_of(states)
        # Note [staging cache]: a buffer is tagged at commit with the last sub-group packed into
        # it. A window reuses buffers within a step: were an earlier one's claim kept, a later
        # host-tier sub-group (which leaves nothing in the buffer) would leave it tagged as holding
        # the earlier one's state, and the next step would read another sub-group's bytes.
        run.packed[id(buf)] = (buf, i)
        if not layout.entries:  # nothing to tier (no state yet, or only scalars)
            run.pending[i] = (layout, pack(layout, _NO_BYTES, states), rec.path, None, None)
            return
        path = rec.path or self._choose(run, i, layout.nbytes)
        if path == RESIDENT:
            memory = StagingBuffer(self.bind)
            small = pack(layout, memory.ensure(layout.nbytes), states)
            run.pending[i] = (layout, small, RESIDENT, None, memory)
            return
        if path in IN_PLACE_TIERS:  # host memory: packed straight into the slot, no staging, no write
            run.packed[id(buf)] = (buf, None)  # and no staging buffer holds it (Note [staging cache])
            slot = self.tiers[path].reserve(layout.nbytes)
            run.pending[i] = (layout, [], path, slot, None)  # freed by a rollback should pack fail
            run.pending[i] = (layout, pack(layout, self._slot_memory(path, slot), states), path, slot, None)
            return
        dst = buf.ensure(layout.nbytes)
        small = pack(layout, dst, states)
        slot = self.tiers[path].reserve(layout.nbytes)
        run.pending[i] = (layout, small, path, slot, None)
        handle = self._limited(path, lambda: self.tiers[path].write(slot, dst))
        buf.busy.append(handle)
        run.writes.append((i, handle))
        self.counters["writes"] += 1
        self.counters["bytes_written"] += layout.nbytes

    def check_room(self, state_bytes: Sequence[Optional[int]]) -> None:
        """Place every sub-group's predicted state (``None``: unknown, skipped) as the first step
        will, so a state that cannot fit its paths is refused when the optimizer is built.

        Raises:
            TierFullError: some sub-group would find no room; the message says what to change.
        """
        resident = 0
        used = {p: self.path_bytes[p] for p in self.path_bytes}
        for i, nbytes in enumerate(state_bytes):
            if nbytes is None:
                continue
            if resident + nbytes <= self.resident_bytes:
                resident += nbytes
                continue
            path = choose_path(self.paths, used, nbytes)
            if path is None:
                total = sum(n for n in state_bytes if n is not None)
                raise TierFullError(
                    f"the optimizer state ({total / 2 ** 30:,.2f} GiB in {len(state_bytes)} sub-groups) does not fit "
                    f"{self.key}.paths: sub-group {i} ({nbytes} B) finds no room after "
                    + ", ".join(f"{p.name} took {used[p.name]} of {p.capacity_bytes} B" for p in self.paths)
                    + f" (a path on nvme/numa keeps room for two copies, Note [atomic step]); raise the tiers' "
                    f"budgets or free disk space, add a path to {self.key}.paths, raise {self.key}.resident_bytes, "
                    f"or set {self.key}.atomic_step=false")
            used[path] += nbytes

    def _choose(self, run: StepRun, i: int, nbytes: int) -> str:
        """Where a sub-group's first state lives: resident while room is left, else the striped paths."""
        if self.resident_used + run.claimed[RESIDENT] + nbytes <= self.resident_bytes:
            run.claimed[RESIDENT] += nbytes
            return RESIDENT
        used = {p: self.path_bytes[p] + run.claimed[p] for p in self.path_bytes}
        path = choose_path(self.paths, used, nbytes)
        if path is None:
            raise TierFullError(
                f"no path has room for sub-group {i} ({nbytes} B of state): "
                + ", ".join(f"{p.name} holds {self.path_bytes[p.name]} of {p.capacity_bytes} B" for p in self.paths)
                + f"; raise the tiers' budgets (a step on nvme/numa needs room for two copies, Note [atomic step]), "
                f"add a path to {self.key}.paths, or set {self.key}.atomic_step=false")
        run.claimed[path] += nbytes
        return path

    def _limited(self, path: str, start: Callable[[], TransferHandle]) -> TransferHandle:
        queue = self._inflight[path]
        while queue and queue[0].done():
            queue.popleft()
        while len(queue) >= self.max_inflight_per_path:
            queue.popleft().exception()
        handle = start()
        queue.append(handle)
        return handle

    def drain(self, run: StepRun) -> None:
        """Wait for every write of the step; raise the first failure."""
        t0 = time.perf_counter()
        for _, handle in run.writes:
            handle.exception()
        self.counters["drain_s"] += time.perf_counter() - t0
        for _, handle in run.writes:
            if handle.exception() is not None:
                raise handle.exception()

    def commit(self, run: StepRun) -> None:
        """Make the drained copy phase current: new parameters in, old slots freed."""
        for i, new in run.new_params.items():
            self.updater.apply(i, new)
        for i, (layout, small, path, slot, memory) in run.pending.items():
            rec = self.records[i]
            self._forget(rec)
            if path == RESIDENT:
                self.resident_used += layout.nbytes
            elif path is not None and slot is not None:
                self.path_bytes[path] += layout.nbytes
            rec.layout, rec.small, rec.path, rec.slot, rec.memory = layout, small, path, slot, memory
            rec.version += 1
        for buf, i in run.packed.values():
            if i is not None and run.pending[i][3] is not None:  # its state went to a slot, from this buffer
                buf.tag = (i, self.records[i].version)

    def rollback(self, run: StepRun) -> None:
        """Undo an uncommitted copy phase: fresh slots freed, proxies dropped, caches invalidated."""
        for _, handle in run.writes:
            handle.exception()  # settled before its slot is freed
        for _, (_, _, path, slot, _) in run.pending.items():
            if slot is not None:
                self.tiers[path].free(slot)
        for buf in self.buffers:
            buf.wait()
            buf.tag = None

    # --- phase 2: in place -------------------------------------------------------------------------

    def update_in_place(self, indices: Sequence[int], where: Optional[Sequence[str]]) -> None:
        """Update sub-groups directly in their host memory (Note [in-place update]).

        CPU parameters: one call of the wrapped step over all of them; CUDA ones: one at a time.
        """
        memories = [self.memory_of(i) for i in indices]
        states = [unpack(self.records[i].layout, m, self.records[i].small) for i, m in zip(indices, memories)]
        if where is None:
            news = self.updater.update_many(indices, states, sum(self.records[i].layout.nbytes for i in indices))
        else:
            news = [self.updater.update(i, s, where=where[i], aside=False, state_bytes=self.records[i].layout.nbytes)[0]
                    for i, s in zip(indices, states)]
        for i, memory, new_states in zip(indices, memories, news):
            self._settle_in_place(i, memory, new_states)

    def _settle_in_place(self, i: int, memory: torch.Tensor, new_states: List[Dict[str, Any]]) -> None:
        rec = self.records[i]
        layout = layout_of(new_states)
        self.counters["in_place_updates"] += 1
        if layout == rec.layout:
            rec.small = pack(layout, memory, new_states)  # copies in only what the optimizer replaced
            return
        run = StepRun()  # the optimizer added state: it needs a new home (Note [layout is rediscovered])
        try:
            self.store(run, i, new_states, self.take_buffer(set()))
            self.drain(run)
        except TierError as exc:
            self.rollback(run)
            raise TierError(f"sub-group {i}'s state grew after its first step and no tier has room for it ({exc}); "
                            f"this step is partly applied (Note [in-place update]); raise the budget") from exc
        self.commit(run)

    def memory_of(self, i: int) -> torch.Tensor:
        """The host memory holding sub-group ``i``'s state (resident buffer or host-tier slot)."""
        rec = self.records[i]
        if rec.path == RESIDENT:
            return rec.memory.tensor[:rec.layout.nbytes]
        return self._slot_memory(rec.path, rec.slot)

    def _slot_memory(self, path: str, slot: Slot) -> torch.Tensor:
        tier = self.tiers[path]
        if not isinstance(tier, PooledTier):
            raise AssertionError(f"in-place access to {tier.name}, which is not host memory")
        # Note [in-place update]: the slot's bytes, through the pool that owns them. No transfer is
        # ever in flight on such a slot: it is only written through this view.
        return tier.pool.view(tier._state(slot).storage, slot.nbytes)

    # --- whole-optimizer operations --------------------------------------------------------------

    def read_states(self, i: int) -> List[Dict[str, Any]]:
        """Committed state of sub-group ``i`` as new host tensors (for state_dict)."""
        rec = self.records[i]
        if rec.layout is None:
            return [{} for _ in self.subgroups[i].param_ids]
        if rec.slot is None and rec.path != RESIDENT:  # scalars only
            return _clone_small([{k: s[k] for k in keys} for s, keys in zip(rec.small, rec.layout.keys)])
        buf = torch.empty(rec.layout.nbytes, dtype=torch.uint8)
        if rec.path == RESIDENT or rec.path in IN_PLACE_TIERS:
            buf.copy_(self.memory_of(i))
        else:
            self.tiers[rec.path].read(rec.slot, buf).wait()
        return unpack(rec.layout, buf, _clone_small(rec.small))

    def trim(self, *, copy_all: bool) -> None:
        """Release the staging buffers when no sub-group will be streamed next step."""
        if all(self.in_place(i, copy_all=copy_all) for i in range(len(self.records))):
            for buf in self.buffers:
                buf.release()

    def close(self) -> None:
        for buf in self.buffers:
            buf.release()
        for rec in self.records:
            self._forget(rec)
            rec.slot = rec.memory = None

    def _forget(self, rec: _Record) -> None:
        """Give back what ``rec`` currently holds (its slot or resident bytes)."""
        if rec.slot is not None:
            self.tiers[rec.path].free(rec.slot)
            self.path_bytes[rec.path] -= rec.layout.nbytes
        elif rec.path == RESIDENT and rec.layout is not None:
            self.resident_used -= rec.layout.nbytes


def _clone_small(small: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Small tensors (Adam's step) are updated in place by the optimizer: the committed ones stay intact.
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in small]
