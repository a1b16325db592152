"""The Tier interface: reserve a slot, write a tensor into it, read it back, free it.

Call order for one slot (every tier, host, NUMA or NVMe, behaves the same way)::

    slot = tier.reserve(nbytes)          # capacity is checked here: TierFullError before any work
    h = tier.write(slot, tensor)         # asynchronous; leave `tensor` unmodified until h is done
    h.wait()                             # or poll h.done()
    h = tier.read(slot, out)             # asynchronous; `out` holds the bytes once h is done
    tier.free(slot)                      # returns its space once the slot's transfers are done
    tier.close()                         # or `with tier:`; frees every slot, removes swap files

Operations on one slot run in submission order (a read submitted right after a write sees the
written bytes without the caller waiting in between); operations on different slots run
concurrently, ordered by the scheduler. A pooled tier queues a CUDA tensor's copies on side
streams instead, ordered by events (Note [stream-ordered copies] in ``streams.py``): its handle's
``wait`` blocks the host, and a freed slot is handed out again only after its copies ran. A failed write leaves the slot without valid data: a later
read raises instead of returning stale bytes, and every other slot stays readable.

Implementations provide storage (``_allocate``/``_release``) and the two transfers
(``_start_write``/``_start_read``); this base class owns the slot table, argument checks and
ordering, so the tiers differ only where their hardware differs.
"""

from __future__ import annotations

import abc
import math
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tierflow.offload.core.errors import TierError, TierFullError, TierIOError
from tierflow.offload.tiers import _cuda
from tierflow.offload.tiers._handle import Slot, TransferHandle
from tierflow.offload.tiers.config import SchedulerConfig
from tierflow.offload.tiers.scheduler import TransferScheduler

__all__ = ["Slot", "Tier", "TransferHandle"]


class _SlotState:
    __slots__ = ("slot", "storage", "last", "last_write", "written", "error")

    def __init__(self, slot: Slot, storage: Any) -> None:
        self.slot = slot
        self.storage = storage
        self.last: Optional[TransferHandle] = None  # the latest transfer submitted on this slot
        self.last_write: Optional[TransferHandle] = None
        self.written = False  # a write was submitted
        self.error: Optional[BaseException] = None  # the latest write's error, if it failed


class Tier(abc.ABC):
    """One storage tier. See the module docstring for the call order.

    Args:
        name: the tier's name in the hardware model (``host``, ``numa:0``, ``nvme``...).
        scheduler: a shared :class:`TransferScheduler`; when ``None`` the tier makes and owns one.
    """

    kind: str = ""
    packs = False  # write_packed/read_packed work (Note [packs])

    def __init__(self, name: str, scheduler: Optional[TransferScheduler] = None) -> None:
        self.name = name
        self._owns_scheduler = scheduler is None
        self.scheduler = scheduler if scheduler is not None else TransferScheduler(SchedulerConfig())
        self._lock = threading.Lock()
        self._slots: Dict[int, _SlotState] = {}
        self._next_id = 0
        self._closed = False
        # Freed slots whose last device copy may still run: (its handle, the storage), released
        # once the copy is done (Note [stream-ordered copies] 4).
        self._later: List[Tuple[TransferHandle, Any]] = []

    # --- the interface ------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes this tier may hold at once (its budget)."""

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int:
        """Bytes held by live slots, including alignment padding."""

    def reserve(self, nbytes: int) -> Slot:
        """Reserve space for a tensor of ``nbytes`` bytes.

        Raises:
            ValueError: when ``nbytes`` is not a positive integer.
            TierFullError: when the tier's budget (or disk) cannot hold it; names the setting.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"{self.name}: reserve(nbytes={nbytes!r}) needs a positive integer byte count, e.g. tensor.nbytes")
        self._check_open()
        self._reclaim()
        try:
            storage = self._allocate(nbytes)
        except TierFullError:
            if not self._later:
                raise
            self._reclaim(block=True)  # the room is there once the copies still reading it are done
            storage = self._allocate(nbytes)
        with self._lock:
            slot = Slot(self.name, self._next_id, nbytes)
            self._next_id += 1
            self._slots[slot.slot_id] = _SlotState(slot, storage)
        return slot

    def write(self, slot: Slot, src: torch.Tensor, *, deadline: float = math.inf) -> TransferHandle:
        """Copy ``src`` into ``slot`` asynchronously (an offload).

        Args:
            slot: from :meth:`reserve`; ``src.nbytes`` must equal ``slot.nbytes``.
            src: a CPU or CUDA tensor (non-contiguous ones are copied to contiguous first).
            deadline: queue priority among offloads; earlier runs first.

        Raises:
            ValueError: wrong size or device; KeyError: the slot was freed or is foreign.
        """
        state = self._state(slot)
        src_bytes = _as_bytes(self.name, "write", slot, src.contiguous(), writable=False)
        return self._write(state, f"write {self.name} slot {slot.slot_id}", [(0, src_bytes)],
                           lambda ready: self._start_write(state.storage, src_bytes, deadline, ready))

    def write_packed(self, slot: Slot, pieces: Sequence[Tuple[int, torch.Tensor]]) -> TransferHandle:
        """Copy several tensors into one slot, each at its byte offset, as one transfer (Note [packs]
        in ``offload/runtime/_packs.py``). Only tiers with ``packs = True`` (the pooled ones).

        Args:
            pieces: ``(offset, tensor)`` pairs; each tensor contiguous, within the slot, all on one device.
        """
        state = self._state(slot)
        flat = self._pieces(slot, pieces, "write_packed")
        return self._write(state, f"write {self.name} slot {slot.slot_id} ({len(flat)} tensors)", flat,
                           lambda ready: self._start_pack(state.storage, flat, True))

    def read(self, slot: Slot, dst: torch.Tensor, *, deadline: float = math.inf) -> TransferHandle:
        """Copy the slot's bytes into ``dst`` asynchronously (a prefetch).

        Args:
            slot: a written slot; ``dst.nbytes`` must equal ``slot.nbytes``.
            dst: a contiguous CPU or CUDA tensor to fill (any dtype: bytes are copied as they are).
            deadline: queue priority among prefetches; earlier runs first.

        Raises:
            ValueError: wrong size, device or layout; TierError: the slot was never written.
        """
        state = self._state(slot)
        if not dst.is_contiguous():
            raise ValueError(f"{self.name}: read into a non-contiguous tensor; pass a contiguous one (e.g. torch.empty(t.shape, dtype=t.dtype))")
        dst_bytes = _as_bytes(self.name, "read", slot, dst, writable=True)
        return self._read(state, f"read {self.name} slot {slot.slot_id}", [(0, dst_bytes)],
                          lambda ready: self._start_read(state.storage, dst_bytes, deadline, ready))

    def read_packed(self, slot: Slot, pieces: Sequence[Tuple[int, torch.Tensor]]) -> TransferHandle:
        """Copy parts of a slot written by :meth:`write_packed` into several tensors, as one transfer.

        Args:
            pieces: ``(offset, tensor)`` pairs: each tensor is filled from its offset in the slot.
        """
        state = self._state(slot)
        flat = self._pieces(slot, pieces, "read_packed")
        return self._read(state, f"read {self.name} slot {slot.slot_id} ({len(flat)} tensors)", flat,
                          lambda ready: self._start_pack(state.storage, flat, False))

    def free(self, slot: Slot) -> None:
        """Return the slot's space, after its transfers finish (their errors are not re-raised)."""
        with self._lock:
            state = self._slots.pop(slot.slot_id, None)
        if state is None or state.slot != slot:
            raise KeyError(f"{self.name}: slot {slot.slot_id} is not live in this tier (freed twice, or from another tier)")
        last = state.last
        if last is not None and last.stream_ordered and not last.done():
            with self._lock:  # a device copy may still use it: released later (Note [stream-ordered copies] 4)
                self._later.append((last, state.storage))
            return
        if last is not None:
            last.exception()  # waits; errors were reported through the handle
        self._release(state.storage)
        self._reclaim()

    def close(self) -> None:
        """Release every slot and the tier's memory or files. Idempotent.

        A tier that owns its scheduler cancels its queued transfers first (their handles raise
        TransferCancelled) and waits only for the running ones; with a shared scheduler it waits
        for its own transfers (close the :class:`~tierflow.offload.tiers.engine.TierEngine` to cancel them all).
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            states = list(self._slots.values())
            self._slots.clear()
        try:
            if self._owns_scheduler:
                self.scheduler.close()  # queued transfers are cancelled, running ones finish
            for state in states:
                if state.last is not None:
                    state.last.exception()  # settled: done, failed or cancelled
            self._reclaim(block=True)
        finally:
            self._close_storage()

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def __enter__(self) -> "Tier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def device_streams(self, t: Any) -> Optional[Any]:
        """The :class:`~tierflow.offload.tiers.streams.Streams` that order this tier's copies of
        ``t`` (a device tensor or storage), or None when they are host transfers (every tier but
        the pooled ones on CUDA)."""
        return None

    # --- what an implementation provides ------------------------------------------------------

    @abc.abstractmethod
    def _allocate(self, nbytes: int) -> Any:
        """Storage for ``nbytes`` (raise TierFullError naming the budget setting when it does not fit)."""

    @abc.abstractmethod
    def _release(self, storage: Any) -> None:
        """Give back what :meth:`_allocate` returned; no transfer on it is in flight."""

    @abc.abstractmethod
    def _start_write(self, storage: Any, src: torch.Tensor, deadline: float, ready: Any) -> TransferHandle:
        """Queue the copy of ``src`` (flat uint8, CPU or CUDA) into ``storage``.

        ``ready`` is None for CPU tensors; for CUDA ones, an event the copy's stream must wait on.
        This may be called on a worker thread (when the slot's previous transfer completes there).
        """

    @abc.abstractmethod
    def _start_read(self, storage: Any, dst: torch.Tensor, deadline: float, ready: Any) -> TransferHandle:
        """Queue the copy of ``storage`` into ``dst`` (flat uint8, CPU or CUDA); ``ready`` as above."""

    @abc.abstractmethod
    def _close_storage(self) -> None:
        """Release everything the tier holds (slabs, files); called once, after the slots are freed."""

    def _start_pack(self, storage: Any, pieces: List[Tuple[int, torch.Tensor]], write: bool) -> TransferHandle:
        """Queue the host copies of a pack (``write``: tensors into ``storage``); tiers with ``packs``."""
        raise NotImplementedError(f"{type(self).__name__} does not move packs")

    def _ordered(self, storage: Any, pieces: List[Tuple[int, torch.Tensor]], write: bool, streams: Any,
                 waits: List[Any], what: str) -> TransferHandle:
        """Queue the device copies of ``pieces`` (a whole-slot tensor is one piece at offset 0) on a
        stream after ``waits`` (events); for tiers whose :meth:`device_streams` returns streams."""
        raise NotImplementedError(f"{type(self).__name__} has no stream-ordered copies")

    # --- helpers ------------------------------------------------------------------------------

    def _write(self, state: _SlotState, what: str, pieces: List[Tuple[int, torch.Tensor]],
               start: Callable[[Any], TransferHandle]) -> TransferHandle:
        """Queue a write of ``pieces``: on a stream when streams order this tier's copies of them,
        else ``start(ready)`` after the slot's previous transfer."""
        streams = self.device_streams(pieces[0][1])
        if streams is not None:
            handle = self._queue(state, streams, pieces, True, what)
            state.written, state.last_write, state.error = True, handle, None
            return handle
        ready = _cuda.ready_event(pieces[0][1])  # recorded on the caller's stream, now
        handle = self._then(state, what, lambda: start(ready))
        state.written, state.last_write = True, handle

        def record(h: TransferHandle) -> None:
            # Runs before any read queued behind this write starts (callbacks run in order).
            if state.last_write is h:
                state.error = h._future.exception()

        handle.add_done_callback(record)
        return handle

    def _read(self, state: _SlotState, what: str, pieces: List[Tuple[int, torch.Tensor]],
              start: Callable[[Any], TransferHandle]) -> TransferHandle:
        """Queue a read into ``pieces``, as :meth:`_write`; a slot whose last write failed raises instead."""
        slot = state.slot
        if not state.written:
            raise TierError(f"{self.name}: slot {slot.slot_id} was never written; call write(slot, tensor) first")

        def valid() -> None:
            if state.error is not None:
                raise TierIOError(f"{self.name}: slot {slot.slot_id} holds no valid data: its last write failed "
                                  f"({state.error}); write it again")

        streams = self.device_streams(pieces[0][1])
        if streams is not None:
            valid()
            return self._queue(state, streams, pieces, False, what)
        ready = _cuda.ready_event(pieces[0][1])  # earlier work that still uses the tensor finishes first

        def begin() -> TransferHandle:
            valid()
            return start(ready)

        return self._then(state, what, begin)

    def _pieces(self, slot: Slot, pieces: Sequence[Tuple[int, torch.Tensor]], op: str) -> List[Tuple[int, torch.Tensor]]:
        if not self.packs:
            raise NotImplementedError(f"{self.name}: {type(self).__name__} does not move packs; use write/read per tensor")
        if not pieces:
            raise ValueError(f"{self.name}: {op} needs at least one (offset, tensor) piece")
        if not all(t.is_contiguous() for _, t in pieces):
            raise ValueError(f"{self.name}: {op} of a non-contiguous tensor; pass contiguous ones")
        return [(offset, _as_bytes(self.name, op, slot, t, writable=op == "read_packed", offset=offset))
                for offset, t in pieces]

    def _queue(self, state: _SlotState, streams: Any, pieces: List[Tuple[int, torch.Tensor]], write: bool,
               what: str) -> TransferHandle:
        """Queue a stream-ordered copy on this thread now (Note [stream-ordered copies]): it waits
        for the compute stream's work so far and for the slot's previous copy, on the device."""
        waits = [streams.record(streams.compute(pieces[0][1].device))]
        previous = state.last
        if previous is not None and not previous.done():
            if previous.stream_ordered:
                waits.append(previous.event)
            else:
                previous.exception()  # a host transfer on this slot finishes first (a mixed slot)
        handle = self._ordered(state.storage, pieces, write, streams, waits, what)
        state.last = handle
        return handle

    def _reclaim(self, block: bool = False) -> None:
        """Release the freed slots whose device copies are done (all of them, waiting, if ``block``)."""
        if not self._later:
            return  # the common case, on every reserve and free
        with self._lock:
            later, self._later = self._later, []
        keep = []
        for handle, storage in later:
            if block:
                handle.wait()
            if handle.done():
                self._release(storage)
            else:
                keep.append((handle, storage))
        if keep:
            with self._lock:
                self._later[:0] = keep

    def _check_open(self) -> None:
        if self._closed:
            raise TierError(f"{self.name}: the tier is closed; open a new one")

    def _state(self, slot: Slot) -> _SlotState:
        self._check_open()
        with self._lock:
            state = self._slots.get(slot.slot_id)
        if state is None or state.slot != slot:
            raise KeyError(f"{self.name}: slot {slot.slot_id} is not live in this tier (freed, or from another tier)")
        return state

    def _then(self, state: _SlotState, what: str, start: Callable[[], TransferHandle]) -> TransferHandle:
        """Start ``start()`` after the slot's previous transfer, returning a handle for it now."""
        with self._lock:
            previous, handle = state.last, TransferHandle(what, state.slot.nbytes)
            state.last = handle
        if previous is None or previous.done():
            handle._follow(start)
        else:
            previous.add_done_callback(lambda _: handle._follow(start))
        return handle


def _as_bytes(tier: str, op: str, slot: Slot, t: torch.Tensor, *, writable: bool,
              offset: Optional[int] = None) -> torch.Tensor:
    """``t``'s storage as a flat uint8 tensor, after checking size and device: the whole slot, or
    (with ``offset``) a part of it at that byte offset."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{tier}: {op} needs a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{tier}: {op} supports CPU and CUDA tensors, got one on {t.device}; move it with .cpu()")
    nbytes = t.numel() * t.element_size()
    if offset is None and nbytes != slot.nbytes:
        raise ValueError(f"{tier}: {op} of a {nbytes}-byte tensor into slot {slot.slot_id} of {slot.nbytes} bytes; "
                         f"sizes must match (reserve(tensor.nbytes) for each tensor)")
    if offset is not None and not 0 <= offset <= slot.nbytes - nbytes:
        raise ValueError(f"{tier}: {op}: {nbytes} bytes at offset {offset} do not fit slot {slot.slot_id} of "
                         f"{slot.nbytes} bytes")
    if writable and t.requires_grad and t.is_leaf:
        raise ValueError(f"{tier}: read into a leaf tensor that requires grad; read into t.detach() instead")
    return t.detach().reshape(-1).view(torch.uint8)
