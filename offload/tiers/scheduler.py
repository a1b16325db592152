"""The transfer scheduler: per-link priority queues served by a bounded set of worker threads.

A *link* is one path that transfers contend for: ``host`` (memory copies into the host pool),
``numa:<node>``, ``nvme:<index>`` (one per swap directory). Each link has its own queue and at most ``limit`` transfers running at once
(concurrent offloads contend for the same bandwidth, so an unbounded number only adds queueing
inside the OS or the driver, where nobody can reorder them).

Note [prefetch before offload]: a queue is ordered by ``(kind, deadline, submission order)`` with
prefetches ahead of offloads: a prefetch that misses its deadline stalls compute, an offload that
runs late only holds memory a little longer. Among prefetches the earliest deadline goes first.

A worker runs the transfer itself (memcpy and file I/O release the GIL); an NVMe transfer of a
CUDA tensor stages it on the worker's own stream. Copies between a CUDA tensor and the host or NUMA
pool never come here: the caller queues them on a side stream (Note [stream-ordered copies] in
``streams.py``).

Clean shutdown: :meth:`TransferScheduler.close` cancels what is still queued (their handles raise
:class:`~tierflow.offload.core.errors.TransferCancelled`), lets running transfers finish and joins every worker.
Workers are daemon threads and a finalizer closes a forgotten scheduler, so the interpreter
never hangs at exit.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from tierflow.offload.core.errors import TransferCancelled
from tierflow.offload.tiers.config import SchedulerConfig

__all__ = ["LinkStats", "TransferKind", "TransferScheduler", "WorkerContext"]

THREAD_PREFIX = "tierflow-"


class TransferKind(enum.IntEnum):
    """Why a transfer runs; the value is its rank in a queue (lower runs first)."""

    PREFETCH = 0  # bringing a tensor back before it is needed
    OFFLOAD = 1  # moving an idle tensor out


@dataclass(frozen=True)
class LinkStats:
    """Counters of one link since the scheduler started.

    Attributes:
        link: link name.
        limit: transfers allowed in flight at once.
        completed: transfers finished (successfully or not).
        nbytes: bytes of finished transfers.
        busy_s: summed seconds transfers spent running (> wall time when several overlap).
    """

    link: str
    limit: int
    completed: int
    nbytes: int
    busy_s: float


class WorkerContext:
    """Per-worker resources a transfer may use: a CUDA stream and scratch buffers.

    A resource made by :meth:`local` lives as long as the worker and is closed (if it has a
    ``close`` method) when the worker exits; this is how bounce buffers are reused without locks.
    """

    def __init__(self, link: str, *, caller: bool = False) -> None:
        self.link = link
        self.caller = caller  # True when a waiting caller runs the transfer (Note [help while waiting])
        self._stream: Any = None
        self._local: Dict[Any, Any] = {}

    def cuda_stream(self, device: Any) -> Any:
        """This worker's CUDA stream on ``device`` (created on first use)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def local(self, key: Any, factory: Callable[[], Any]) -> Any:
        """A per-worker object under ``key``, made by ``factory`` on first use."""
        obj = self._local.get(key)
        if obj is None:
            obj = self._local[key] = factory()
        return obj

    def close(self) -> None:
        for obj in self._local.values():
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._local.clear()


class _Task:
    __slots__ = ("key", "fn", "future", "nbytes", "inline", "claimed")

    def __init__(self, key: Tuple[int, float, int], fn: Callable[[WorkerContext], None], future: Future,
                 nbytes: int, inline: bool) -> None:
        self.key, self.fn, self.future, self.nbytes, self.inline = key, fn, future, nbytes, inline
        self.claimed = False

    def __lt__(self, other: "_Task") -> bool:
        return self.key < other.key


class _Shared:
    """State the workers and the finalizer share; holds no reference to the scheduler."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.links: Dict[str, "_Link"] = {}
        self.closed = False


class _Link:
    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.queue: List[_Task] = []  # heap; claimed tasks are skipped when popped
        self.inline: Dict[Future, _Task] = {}  # queued tasks a waiting caller may run itself
        self.workers: List[threading.Thread] = []
        self.idle = 0
        self.running = 0
        self.completed = 0
        self.nbytes = 0
        self.busy_s = 0.0


class TransferScheduler:
    """Runs transfers on per-link queues with a concurrency limit per link.

    Args:
        config: default and per-link concurrency limits.

    Example:
        >>> with TransferScheduler(SchedulerConfig()) as sched:
        ...     fut = sched.submit("host", lambda ctx: None, kind=TransferKind.OFFLOAD)
        ...     fut.result()
    """

    def __init__(self, config: SchedulerConfig = SchedulerConfig()) -> None:
        self.config = config
        self._shared = _Shared()
        self._cond = self._shared.cond
        self._links = self._shared.links
        self._seq = itertools.count()
        # Runs at garbage collection or interpreter exit if close() was never called.
        self._finalizer = weakref.finalize(self, _shutdown, self._shared, None)

    # --- submitting -------------------------------------------------------------------------

    def register_link(self, link: str, default_limit: Optional[int] = None) -> int:
        """Declare a link with the limit its tier wants unless ``config.link_limits`` overrides it.

        Returns:
            The limit in force.
        """
        with self._cond:
            return self._link(link, default_limit).limit

    def submit(self, link: str, fn: Callable[[WorkerContext], None], *, kind: TransferKind,
               deadline: float = math.inf, nbytes: int = 0, inline: bool = False) -> Future:
        """Queue ``fn(ctx)`` on ``link``.

        Args:
            link: link name; created with the default limit on first use.
            fn: the transfer; runs on a worker thread of this link. Exceptions go to the future.
            kind: prefetches run before offloads (Note [prefetch before offload]).
            deadline: any sortable number (seconds, a step-point index); earlier runs first.
            nbytes: bytes moved, for the link's counters.
            inline: a caller that waits for this transfer before a worker took it may run it on its
                own thread (see :meth:`run_inline`); only for ``fn`` that needs no worker resources.

        Returns:
            A future completed when ``fn`` returns or raises.

        Raises:
            TransferCancelled: when the scheduler is closed.
        """
        future: Future = Future()
        with self._cond:
            if self._shared.closed:
                raise TransferCancelled(f"cannot queue a transfer on link {link!r}: the scheduler is closed")
            state = self._link(link, None)
            task = _Task((int(kind), float(deadline), next(self._seq)), fn, future, nbytes, inline)
            heapq.heappush(state.queue, task)
            if inline:
                state.inline[future] = task
            if state.idle == 0 and len(state.workers) < state.limit:
                self._spawn(state)
            self._cond.notify_all()
        return future

    def run_inline(self, future: Future) -> bool:
        """Run the queued transfer behind ``future`` on this thread, if no worker has taken it.

        Note [help while waiting]: a caller about to block on a transfer that is still queued runs
        it itself instead of waiting for a worker to wake up (a context switch, hundreds of
        microseconds on a busy machine: as long as a small copy). The link's limit still holds:
        the caller counts as one of its workers while it runs the transfer.

        Returns:
            True when the transfer ran here.
        """
        with self._cond:
            for state in self._links.values():
                task = state.inline.get(future)
                if task is not None:
                    break
            else:
                return False
            if task.claimed or state.running >= state.limit:
                return False
            task.claimed = True
            del state.inline[future]
            state.running += 1
        _run(self._shared, state, task, WorkerContext(state.name, caller=True))
        return True

    def run_here(self, link: str, fn: Callable[[WorkerContext], None], *, nbytes: int = 0) -> Optional[Future]:
        """Run ``fn`` on this thread now, as one of ``link``'s transfers, when the link has room and
        nothing queued ahead of it; returns its (done) future, or None (then :meth:`submit` it).

        Note [small copies run here]: handing a small host copy to a worker costs far more than the
        copy (about 1 ms per tensor out and back here, most of it the training thread waiting for
        the GIL the worker holds: ``benchmarks/transfer_cost.py``). A copy of a few hundred KiB
        takes microseconds, so the caller makes it itself; the link's limit and counters still
        hold, and nothing overtakes a transfer already queued on the link.
        """
        with self._cond:
            if self._shared.closed:
                raise TransferCancelled(f"cannot run a transfer on link {link!r}: the scheduler is closed")
            state = self._link(link, None)
            if state.queue or state.running >= state.limit:
                return None
            state.running += 1
        task = _Task((0, 0.0, 0), fn, Future(), nbytes, False)
        _run(self._shared, state, task, WorkerContext(state.name, caller=True))
        return task.future

    def stats(self) -> Dict[str, LinkStats]:
        """Counters per link."""
        with self._cond:
            return {n: LinkStats(n, l.limit, l.completed, l.nbytes, l.busy_s) for n, l in self._links.items()}

    def threads(self) -> List[threading.Thread]:
        """The worker threads alive now (for tests and diagnostics)."""
        with self._cond:
            return [t for l in self._links.values() for t in l.workers if t.is_alive()]

    # --- shutdown -----------------------------------------------------------------------------

    def close(self, timeout: Optional[float] = None) -> None:
        """Cancel queued transfers, let running ones finish, join every worker. Idempotent.

        Args:
            timeout: seconds to wait for running transfers; ``None`` waits for them (each is at most
                one chunk, so this is bounded by one I/O).
        """
        self._finalizer.detach()
        _shutdown(self._shared, timeout)

    @property
    def closed(self) -> bool:
        return self._shared.closed

    def __enter__(self) -> "TransferScheduler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------

    def _link(self, name: str, default_limit: Optional[int]) -> _Link:
        state = self._links.get(name)
        if state is None:
            limit = self.config.link_limits.get(name, default_limit or self.config.max_inflight_per_link)
            state = self._links[name] = _Link(name, int(limit))
        return state

    def _spawn(self, state: _Link) -> None:
        thread = threading.Thread(target=_worker, args=(self._shared, state),
                                  name=f"{THREAD_PREFIX}{state.name}-{len(state.workers)}", daemon=True)
        state.workers.append(thread)
        thread.start()


def _worker(shared: _Shared, state: _Link) -> None:
    cond = shared.cond
    ctx = WorkerContext(state.name)
    try:
        while True:
            with cond:
                while True:
                    while state.queue and state.queue[0].claimed:  # run inline by a waiting caller
                        heapq.heappop(state.queue)
                    if state.queue and state.running < state.limit:
                        break
                    if shared.closed and not state.queue:
                        return
                    state.idle += 1
                    cond.wait()
                    state.idle -= 1
                task = heapq.heappop(state.queue)
                task.claimed = True
                state.inline.pop(task.future, None)
                state.running += 1
            _run(shared, state, task, ctx)
    finally:
        ctx.close()


def _run(shared: _Shared, state: _Link, task: _Task, ctx: WorkerContext) -> None:
    """Run one claimed task and settle its future (on a worker, a helping caller, or a caller
    running a small copy itself)."""
    start = time.perf_counter()
    try:
        if task.future.set_running_or_notify_cancel():
            try:
                task.fn(ctx)
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the caller's handle
                task.future.set_exception(exc)
            else:
                task.future.set_result(None)
    finally:
        with shared.cond:
            state.running -= 1
            state.completed += 1
            state.nbytes += task.nbytes
            state.busy_s += time.perf_counter() - start
            shared.cond.notify_all()


def _shutdown(shared: _Shared, timeout: Optional[float]) -> None:
    cond, links = shared.cond, shared.links
    with cond:
        shared.closed = True
        cancelled = []
        for state in links.values():
            cancelled.extend(task.future for task in state.queue if not task.claimed)
            state.queue.clear()
            state.inline.clear()
        workers = [t for state in links.values() for t in state.workers]
        cond.notify_all()
    for future in cancelled:
        if future.set_running_or_notify_cancel():
            future.set_exception(TransferCancelled("the scheduler was closed before this transfer ran"))
    deadline = None if timeout is None else time.monotonic() + timeout
    current = threading.current_thread()
    for thread in workers:
        if thread is not current:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
