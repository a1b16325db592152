"""CUDA's stream semantics on CPU tensors: a checker for the order of waits and frees without a GPU.

The compute stream is the Python thread itself: the model's work has run by the time anything is
recorded on it. Each side stream defers its copies in a FIFO until something forces them: a host
``synchronize`` on one of its events, the compute stream waiting on one (the compute stream goes on
at once, so the copy must have run), another stream's queued wait, or, at random (seeded), the
device making progress on its own. So an ordering the runtime leaves out shows up as:

- a storage freed while a queued copy still uses its memory: :class:`SimOrderError` at once;
- a copy queued without waiting for the compute stream's latest work: :class:`SimOrderError`;
- two copies on different side streams touching the same memory (a pool slot handed out again
  while a copy still reads it) without an event between them: :class:`SimOrderError`;
- a tensor used before its copy back ran: it reads poison (grown storages are filled with 0xFF,
  NaN for floats), and the run is no longer bit-identical.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch

from tierflow.offload.tiers.streams import Streams


class SimOrderError(AssertionError):
    """An ordering CUDA needs is missing."""


class _Stream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ops: List[Tuple[Any, ...]] = []  # ("wait", event) or ("copy", dst, src, ranges)
        self.ran = 0  # ops run so far
        self.waited: Dict[str, int] = {}  # stream name -> ops of it this stream is ordered after
        self.compute_seen = -1  # the latest compute event this stream waited on


class _Event:
    def __init__(self, stream: _Stream, seq: int, compute_mark: int) -> None:
        self.stream, self.seq, self.compute_mark = stream, seq, compute_mark


def _span(t: torch.Tensor) -> Tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlap(a: Tuple[int, int], b: Tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class SimStreams(Streams):
    """Streams whose side-stream copies run as late as CUDA allows (see the module docstring).

    Args:
        seed: the random progress the device makes on its own.
        progress: chance, at each call, that one queued side-stream op runs by itself.
    """

    def __init__(self, seed: int = 0, progress: float = 0.3) -> None:
        self._compute = _Stream("compute")
        self._sides: Dict[str, _Stream] = {}
        self._rng = random.Random(seed)
        self._progress_p = progress
        self._lock = threading.RLock()
        self._compute_marks = 0  # compute events recorded so far
        self.log: List[Tuple[str, ...]] = []
        self.host_syncs = 0
        self.copies = 0

    # --- the Streams interface ------------------------------------------------------------------

    def is_device(self, t: Any) -> bool:
        return True

    def compute(self, device: Any) -> Any:
        return self._compute

    def side(self, device: Any, direction: str) -> Any:
        with self._lock:
            return self._sides.setdefault(direction, _Stream(direction))

    def record(self, stream: Any) -> Any:
        with self._lock:
            self._progress()
            if stream is self._compute:
                self._compute_marks += 1
                self.log.append(("record", "compute"))
                return _Event(stream, 0, self._compute_marks)
            self.log.append(("record", stream.name))
            return _Event(stream, len(stream.ops), 0)

    def wait(self, stream: Any, event: Any) -> None:
        with self._lock:
            self.log.append(("wait", stream.name, event.stream.name))
            if stream is self._compute:
                self._run_to(event)  # later compute work starts now, so the copy has run
                return
            stream.ops.append(("wait", event))
            other = event.stream.name
            stream.waited[other] = max(stream.waited.get(other, 0), event.seq)
            if event.stream is self._compute:
                stream.compute_seen = max(stream.compute_seen, event.compute_mark)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._lock:
            if stream.compute_seen != self._compute_marks:
                raise SimOrderError(f"a copy queued on the {stream.name!r} stream without waiting for the compute "
                                    f"stream's latest event: it could read or write memory a kernel still uses")
            spans = ((_span(src), False), (_span(dst), True))
            self._check_race(stream, spans)
            stream.ops.append(("copy", dst, src, spans))
            self.copies += 1
            self.log.append(("copy", stream.name))
            self._progress()

    def done(self, event: Any) -> bool:
        with self._lock:
            self._progress()
            return event.stream.ran >= event.seq

    def synchronize(self, event: Any) -> None:
        with self._lock:
            self.host_syncs += 1
            self.log.append(("sync", event.stream.name))
            self._run_to(event)

    def free(self, storage: torch.UntypedStorage) -> None:
        with self._lock:
            span = (storage.data_ptr(), storage.data_ptr() + storage.nbytes())
            for stream in self._sides.values():
                for op in stream.ops[stream.ran:]:
                    if op[0] == "copy" and any(_overlap(span, s) for s, _ in op[3]):
                        raise SimOrderError(f"a storage of {storage.nbytes()} bytes freed while a copy queued on "
                                            f"the {stream.name!r} stream still uses it: the compute stream did not "
                                            f"wait for that copy before the free")
            self.log.append(("free",))
            storage.resize_(0)

    def grow(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        with self._lock:
            storage.resize_(nbytes)
            torch.empty(0, dtype=torch.uint8).set_(storage).fill_(0xFF)  # poison until the copy back runs
            self.log.append(("grow",))

    # --- for tests -------------------------------------------------------------------------------

    def pending(self) -> int:
        """Side-stream copies queued and not run yet."""
        with self._lock:
            return sum(op[0] == "copy" for s in self._sides.values() for op in s.ops[s.ran:])

    def drain(self) -> None:
        with self._lock:
            for stream in list(self._sides.values()):
                self._run_to(_Event(stream, len(stream.ops), 0))

    # --- internals -------------------------------------------------------------------------------

    def _run_to(self, event: _Event) -> None:
        stream = event.stream
        while stream.ran < event.seq:
            op = stream.ops[stream.ran]
            if op[0] == "wait":
                self._run_to(op[1])
            else:
                op[1].copy_(op[2])
            stream.ran += 1

    def _progress(self) -> None:
        if self._rng.random() >= self._progress_p:
            return
        busy = [s for s in self._sides.values() if s.ran < len(s.ops)]
        if busy:
            stream = self._rng.choice(busy)
            self._run_to(_Event(stream, stream.ran + 1, 0))

    def _check_race(self, stream: _Stream, spans: Tuple[Tuple[Tuple[int, int], bool], ...]) -> None:
        for other in self._sides.values():
            if other is stream:
                continue  # one stream runs its ops in order
            ordered_after = stream.waited.get(other.name, 0)
            for index in range(max(other.ran, ordered_after), len(other.ops)):
                op = other.ops[index]
                if op[0] != "copy":
                    continue
                for mine, writes in spans:
                    for theirs, they_write in op[3]:
                        if (writes or they_write) and _overlap(mine, theirs):
                            raise SimOrderError(
                                f"a copy on the {stream.name!r} stream touches memory a copy queued on the "
                                f"{other.name!r} stream still {'writes' if they_write else 'reads'}, with no event "
                                f"between them (a pool slot handed out again too early?)")

    def first(self, kind: str) -> Optional[int]:
        """Index in :attr:`log` of the first entry of ``kind``."""
        return next((i for i, e in enumerate(self.log) if e[0] == kind), None)
