"""What a tier hands back: a :class:`Slot` (a reservation) and a :class:`TransferHandle` (a transfer in flight)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

__all__ = ["Slot", "TransferHandle"]


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
