"""Stream-ordered copies between device memory and a pooled tier, and the handle they return.

Note [stream-ordered copies]: a copy between a device tensor and the pinned pool is issued by the
thread that asks for it (the training thread) on a side stream, one per device and direction (PCIe
is full duplex, so a prefetch never queues behind an offload), and nothing on the host waits for
it. Four orderings make that safe. Each is an event wait on the device, never a host block:

1. *Ready.* The side stream waits for an event recorded on the compute stream when the copy is
   issued. An offload then reads its tensor after the kernel that wrote it; a prefetch writes its
   storage after the compute stream allocated it (and after every kernel that used the memory
   before).
2. *Before a free.* The compute stream waits for a copy out before the storage shrinks. The
   caching allocator gives freed memory only to later work of the stream that allocated it (the
   compute stream), and that work now runs after the copy has read it. This is why no
   ``record_stream`` is needed: memory is freed on the stream it was made on.
3. *Before a use.* The compute stream waits for a copy back at the tensor's arrive point.
4. *Host memory.* A pool slot whose last copy may still be running is not handed out again: its
   release waits for the copy's event, polled at later reserve and free calls and synchronized
   only when the pool has no other room.

Two copies on one slot (a write, then a read) are ordered by the second waiting for the first's
event, across the two side streams. The host blocks only where bytes must be on the host: an
NVMe write from the pool, a CPU optimizer step, a checkpoint, a bound on transfers in flight.

:class:`CudaStreams` is the real implementation. Anything with the same methods can stand in for
it: the tests run the runtime on CPU through a simulator that defers every side-stream copy until
CUDA would have to have run it, and fails on a free or a reuse that is not ordered after it.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Tuple

import torch

from tierflow.offload.tiers._handle import TransferHandle

__all__ = ["CudaStreams", "StreamHandle", "Streams"]

OUT, IN = "out", "in"  # side stream directions: device -> pool, pool -> device


class Streams:
    """The stream operations a pooled tier and the residency table need (Note [stream-ordered copies]).

    Subclasses provide every method; ``device`` arguments are a tensor's ``.device``.
    """

    def is_device(self, t: Any) -> bool:
        """Whether ``t`` (a tensor or storage) lives in the memory these streams order."""
        raise NotImplementedError

    def compute(self, device: Any) -> Any:
        """The stream the model's kernels are queued on now."""
        raise NotImplementedError

    def side(self, device: Any, direction: str) -> Any:
        """The copy stream of ``device`` for one direction (:data:`OUT` or :data:`IN`)."""
        raise NotImplementedError

    def record(self, stream: Any) -> Any:
        """An event that completes when the work queued on ``stream`` so far has run."""
        raise NotImplementedError

    def wait(self, stream: Any, event: Any) -> None:
        """Make later work on ``stream`` wait for ``event`` (on the device; the host goes on)."""
        raise NotImplementedError

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue ``dst.copy_(src)`` on ``stream``."""
        raise NotImplementedError

    def done(self, event: Any) -> bool:
        """Whether ``event`` has completed (never blocks)."""
        raise NotImplementedError

    def synchronize(self, event: Any) -> None:
        """Block the host until ``event`` has completed."""
        raise NotImplementedError

    def free(self, storage: torch.UntypedStorage) -> None:
        """Shrink a device storage to nothing (its memory goes back to the compute stream)."""
        storage.resize_(0)

    def grow(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Give an empty device storage ``nbytes`` again (allocated on the compute stream)."""
        storage.resize_(nbytes)


class CudaStreams(Streams):
    """CUDA streams and events; side streams are made on first use, two per device."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._side: Dict[Tuple[int, str], Any] = {}

    def is_device(self, t: Any) -> bool:
        return t.device.type == "cuda"

    def compute(self, device: Any) -> Any:
        return torch.cuda.current_stream(device)

    def side(self, device: Any, direction: str) -> Any:
        key = (torch.device(device).index or 0, direction)
        with self._lock:
            stream = self._side.get(key)
            if stream is None:
                stream = self._side[key] = torch.cuda.Stream(device=device)
        return stream

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def done(self, event: Any) -> bool:
        return bool(event.query())

    def synchronize(self, event: Any) -> None:
        event.synchronize()


class StreamHandle(TransferHandle):
    """A copy queued on a side stream: done when its event has completed.

    The residency table orders the compute stream after it (:meth:`order_compute`) instead of
    waiting for it; :meth:`wait` is the host-side wait, for bytes that must be on the host.
    """

    stream_ordered = True

    def __init__(self, what: str, nbytes: int, streams: Streams, event: Any, device: Any) -> None:
        super().__init__(what, nbytes)
        self.streams, self.event, self.device = streams, event, device

    def done(self) -> bool:
        if not self._future.done() and self.streams.done(self.event):
            self._settle(None)
        return self._future.done()

    def wait(self, timeout: Optional[float] = None) -> None:
        if not self._future.done():
            self.streams.synchronize(self.event)
            self._settle(None)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self.wait(timeout)
        return None

    def add_done_callback(self, fn: Any) -> None:
        # Only a host transfer queued behind a device copy on the same slot asks (a mixed slot,
        # rare): it cannot start before the bytes are there, so wait for them here.
        self.wait()
        fn(self)

    def order_compute(self) -> None:
        """Make the compute stream's later work wait for this copy (Note [stream-ordered copies] 2, 3)."""
        self.streams.wait(self.streams.compute(self.device), self.event)
