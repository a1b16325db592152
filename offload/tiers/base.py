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
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tierflow.offload.core.errors import TierError, TierFullError, TierIOError
from tierflow.offload.tiers import _cuda
from tierflow.offload.tiers.config import SchedulerConfig
from tierflow.offload.tiers.scheduler import TransferScheduler

__all__ = ["Slot", "Tier", "TransferHandle"]


@dataclass(frozen=True)
class Slot:
    """A reservation in a tier.

    Attributes:
        tier: name of the tier that owns it.
        slot_id: unique within the tier.
        nbytes: bytes a tensor written to it must have.
    """

    tier: str
    slot_id: int
    nbytes: int


class TransferHandle:
    """A transfer in flight: wait on it or poll it.

    A handle may stand for many pieces (an NVMe transfer is split into chunks); it is done when all
    are, and :meth:`wait` raises the first piece's error.
    """

    stream_ordered = False  # True for a copy queued on a device stream (Note [stream-ordered copies])

    def __init__(self, what: str, nbytes: int) -> None:
        self.what = what
        self.nbytes = nbytes
        self._future: Future = Future()
        self._future.set_running_or_notify_cancel()
        self._inner: Optional["TransferHandle"] = None  # the handle this one follows (slot order)
        self._helper: Optional[Callable[[], None]] = None  # runs queued work on the waiting thread

    @classmethod
    def gather(cls, what: str, nbytes: int, parts: Sequence[Future],
               helper: Optional[Callable[[], None]] = None) -> "TransferHandle":
        """One handle completed when every future in ``parts`` is.

        ``helper``, if given, is called by :meth:`wait` before blocking (Note [help while waiting]).
        """
        handle = cls(what, nbytes)
        handle._helper = helper
        if not parts:
            handle._future.set_result(None)
            return handle
        lock = threading.Lock()
        state = {"left": len(parts), "error": None}

        def on_part(f: Future) -> None:
            exc = f.exception()
            with lock:
                if exc is not None and state["error"] is None:
                    state["error"] = exc
                state["left"] -= 1
                last = state["left"] == 0
            if last:
                handle._settle(state["error"])

        for part in parts:
            part.add_done_callback(on_part)
        return handle

    def done(self) -> bool:
        """True once the transfer finished, successfully or not (never blocks)."""
        return self._future.done()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until done. A CPU copy still queued is run on this thread rather than waited for.

        Raises:
            TimeoutError: when ``timeout`` seconds pass first (a copy run here is not interrupted).
            TierIOError, TransferCancelled, ...: the transfer's own error.
        """
        handle: Optional[TransferHandle] = self
        while handle is not None and not self._future.done():
            if handle._helper is not None:
                handle._helper()
            handle = handle._inner
        self._future.result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The transfer's error (None on success), waiting up to ``timeout`` seconds."""
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[["TransferHandle"], None]) -> None:
        """Call ``fn(handle)`` when done (at once if already done), on the completing thread."""
        self._future.add_done_callback(lambda _: fn(self))

    def _settle(self, error: Optional[BaseException]) -> None:
        if error is None:
            self._future.set_result(None)
        else:
            self._future.set_exception(error)

    def _follow(self, start: Callable[[], "TransferHandle"]) -> None:
        try:
            inner = start()
        except BaseException as exc:  # noqa: BLE001 - the caller sees it through this handle
            self._settle(exc)
            return
        self._inner = inner
        inner.add_done_callback(lambda h: self._settle(h._future.exception()))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"TransferHandle({self.what}, {self.nbytes} B, {state})"


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
        what = f"write {self.name} slot {slot.slot_id}"
        streams = self.device_streams(src_bytes)
        if streams is not None:
            handle = self._ordered(state, streams, src_bytes, lambda waits: self._ordered_write(
                state.storage, src_bytes, streams, waits, what))
            state.written, state.last_write, state.error = True, handle, None
            return handle
        ready = _cuda.ready_event(src_bytes)  # recorded on the caller's stream, now

        def start() -> TransferHandle:
            return self._start_write(state.storage, src_bytes, deadline, ready)

        handle = self._then(state, what, start)
        state.written, state.last_write = True, handle

        def record(h: TransferHandle) -> None:
            # Runs before any read queued behind this write starts (callbacks run in order).
            if state.last_write is h:
                state.error = h._future.exception()

        handle.add_done_callback(record)
        return handle

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
        if not state.written:
            raise TierError(f"{self.name}: slot {slot.slot_id} was never written; call write(slot, tensor) first")
        if not dst.is_contiguous():
            raise ValueError(f"{self.name}: read into a non-contiguous tensor; pass a contiguous one (e.g. torch.empty(t.shape, dtype=t.dtype))")
        dst_bytes = _as_bytes(self.name, "read", slot, dst, writable=True)
        what = f"read {self.name} slot {slot.slot_id}"
        streams = self.device_streams(dst_bytes)
        if streams is not None:
            if state.error is not None:
                raise TierIOError(f"{self.name}: slot {slot.slot_id} holds no valid data: its last write failed "
                                  f"({state.error}); write it again")
            return self._ordered(state, streams, dst_bytes, lambda waits: self._ordered_read(
                state.storage, dst_bytes, streams, waits, what))
        ready = _cuda.ready_event(dst_bytes)  # earlier work that still uses `dst` finishes first

        def start() -> TransferHandle:
            if state.error is not None:
                raise TierIOError(f"{self.name}: slot {slot.slot_id} holds no valid data: its last write failed "
                                  f"({state.error}); write it again")
            return self._start_read(state.storage, dst_bytes, deadline, ready)

        return self._then(state, what, start)

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

    def _ordered_write(self, storage: Any, src: torch.Tensor, streams: Any, waits: List[Any], what: str) -> TransferHandle:
        """Queue the copy of device ``src`` into ``storage`` on a stream after ``waits`` (events);
        only for tiers whose :meth:`device_streams` returns streams."""
        raise NotImplementedError(f"{type(self).__name__} has no stream-ordered copies")

    def _ordered_read(self, storage: Any, dst: torch.Tensor, streams: Any, waits: List[Any], what: str) -> TransferHandle:
        """Queue the copy of ``storage`` into device ``dst``, as :meth:`_ordered_write`."""
        raise NotImplementedError(f"{type(self).__name__} has no stream-ordered copies")

    # --- helpers ------------------------------------------------------------------------------

    def _ordered(self, state: _SlotState, streams: Any, device_tensor: torch.Tensor,
                 issue: Callable[[List[Any]], TransferHandle]) -> TransferHandle:
        """Issue a stream-ordered copy on this thread now (Note [stream-ordered copies]): it waits
        for the compute stream's work so far and for the slot's previous copy, on the device."""
        waits = [streams.record(streams.compute(device_tensor.device))]
        previous = state.last
        if previous is not None and not previous.done():
            if previous.stream_ordered:
                waits.append(previous.event)
            else:
                previous.exception()  # a host transfer on this slot finishes first (a mixed slot)
        handle = issue(waits)
        state.last = handle
        return handle

    def _reclaim(self, block: bool = False) -> None:
        """Release the freed slots whose device copies are done (all of them, waiting, if ``block``)."""
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


def _as_bytes(tier: str, op: str, slot: Slot, t: torch.Tensor, *, writable: bool) -> torch.Tensor:
    """``t``'s storage as a flat uint8 tensor, after checking size and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{tier}: {op} needs a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{tier}: {op} supports CPU and CUDA tensors, got one on {t.device}; move it with .cpu()")
    nbytes = t.numel() * t.element_size()
    if nbytes != slot.nbytes:
        raise ValueError(f"{tier}: {op} of a {nbytes}-byte tensor into slot {slot.slot_id} of {slot.nbytes} bytes; "
                         f"sizes must match (reserve(tensor.nbytes) for each tensor)")
    if writable and t.requires_grad and t.is_leaf:
        raise ValueError(f"{tier}: read into a leaf tensor that requires grad; read into t.detach() instead")
    return t.detach().reshape(-1).view(torch.uint8)

