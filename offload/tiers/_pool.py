"""A slab pool and the Tier built on it; the host and NUMA tiers differ only in how a slab is made.

Note [pool bound]: slabs are made on demand, ``slab_bytes`` at a time (a request larger than a
slab gets a slab of its own size), and only while the pool stays within ``budget + slab_bytes``.
Reservations are admitted against ``budget_bytes`` alone, so a request beyond the budget fails
before any memory is touched, and pool memory never exceeds budget + one slab. Slabs are kept
until the tier closes: each is mapped, placed and registered with CUDA exactly once.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from tierflow.offload.core.errors import TierFullError
from tierflow.offload.core.units import align_up, format_bytes
from tierflow.offload.tiers._memory import ExtentAllocator, MappedMemory
from tierflow.offload.tiers.base import Tier, TransferHandle
from tierflow.offload.tiers.scheduler import TransferKind, TransferScheduler, WorkerContext
from tierflow.offload.tiers.streams import IN, OUT, CudaStreams, StreamHandle, Streams

#: Host copies up to this size run on the calling thread (Note [small copies run here]).
SMALL_COPY_BYTES = 256 << 10

__all__ = ["PooledTier", "SlabPool"]


@dataclass(frozen=True)
class _Extent:
    slab: int
    offset: int
    nbytes: int


class SlabPool:
    """Slabs of page-aligned memory sliced into page-multiple extents (thread-safe).

    Args:
        tier: tier name, for messages.
        budget_bytes: most bytes of live extents.
        slab_bytes: size of a regular slab.
        budget_setting: the config key that raises the budget, named in TierFullError.
        make_slab: ``make_slab(nbytes) -> MappedMemory``.
        preallocate: make slabs for the whole budget now.
    """

    def __init__(self, *, tier: str, budget_bytes: int, slab_bytes: int, budget_setting: str,
                 make_slab: Callable[[int], MappedMemory], preallocate: bool = False) -> None:
        self.tier = tier
        self.budget_bytes = budget_bytes
        self.slab_bytes = slab_bytes
        self.budget_setting = budget_setting
        self._make_slab = make_slab
        self._lock = threading.Lock()
        self._slabs: List[MappedMemory] = []
        self._allocators: List[ExtentAllocator] = []
        self.used_bytes = 0
        if preallocate:
            while self.pool_bytes < budget_bytes:
                self._add_slab(slab_bytes)

    @property
    def pool_bytes(self) -> int:
        """Bytes of memory the pool holds (live or free)."""
        return sum(s.nbytes for s in self._slabs)

    def alloc(self, nbytes: int) -> _Extent:
        """An extent of at least ``nbytes`` (page-rounded).

        Raises:
            TierFullError: naming the budget and ``budget_setting``.
        """
        need = align_up(nbytes)
        with self._lock:
            if self.used_bytes + need > self.budget_bytes:
                raise TierFullError(
                    f"{self.tier} tier is full: reserving {format_bytes(need)} would hold "
                    f"{format_bytes(self.used_bytes + need)} of its budget {format_bytes(self.budget_bytes)} "
                    f"({self.budget_setting}={self.budget_bytes}); raise {self.budget_setting} or free slots first"
                )
            for index, allocator in enumerate(self._allocators):
                offset = allocator.alloc(need)
                if offset is not None:
                    return self._take(index, offset, need)
            size = max(self.slab_bytes, need)
            if self.pool_bytes + size > self.budget_bytes + self.slab_bytes:
                largest = max((a.largest_free for a in self._allocators), default=0)
                raise TierFullError(
                    f"{self.tier} tier is fragmented: {format_bytes(need)} fits the budget "
                    f"({format_bytes(self.used_bytes)} of {format_bytes(self.budget_bytes)} held) but the largest "
                    f"free extent is {format_bytes(largest)} and a new slab would exceed budget + one slab; raise "
                    f"{self.budget_setting}, or free slots first"
                )
            index = self._add_slab(size)
            offset = self._allocators[index].alloc(need)
            if offset is None:
                raise AssertionError("a fresh slab could not hold the request it was made for")
            return self._take(index, offset, need)

    def free(self, extent: _Extent) -> None:
        with self._lock:
            self._allocators[extent.slab].free(extent.offset, extent.nbytes)
            self.used_bytes -= align_up(extent.nbytes)

    def view(self, extent: _Extent, nbytes: int) -> torch.Tensor:
        """uint8 tensor over the first ``nbytes`` of ``extent``."""
        return self._slabs[extent.slab].view(extent.offset, nbytes)

    def close(self) -> None:
        with self._lock:
            for slab in self._slabs:
                slab.close()
            self._slabs.clear()
            self._allocators.clear()

    def _take(self, index: int, offset: int, need: int) -> _Extent:
        self.used_bytes += need
        return _Extent(index, offset, need)

    def _add_slab(self, size: int) -> int:
        slab = self._make_slab(size)
        self._slabs.append(slab)
        self._allocators.append(ExtentAllocator(slab.nbytes))
        return len(self._slabs) - 1


class PooledTier(Tier):
    """A Tier whose slots live in a :class:`SlabPool` of host memory.

    Copies of CPU tensors run on the scheduler link ``<name>`` (a memcpy: one link, since both
    directions share memory bandwidth). Copies of device tensors are queued by the caller on a side
    stream per direction and ordered by events (Note [stream-ordered copies]); ``streams`` replaces
    the CUDA streams made on first use (the tests pass a simulator).
    """

    packs = True

    def __init__(self, name: str, pool: SlabPool, scheduler: TransferScheduler | None,
                 streams: Optional[Streams] = None) -> None:
        super().__init__(name, scheduler)
        self.pool = pool
        self.streams = streams

    @property
    def capacity_bytes(self) -> int:
        return self.pool.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self.pool.used_bytes

    @property
    def pool_bytes(self) -> int:
        """Memory held by the pool's slabs (at most capacity + one slab, Note [pool bound])."""
        return self.pool.pool_bytes

    def device_streams(self, t: Any) -> Optional[Streams]:
        if self.streams is None:
            if t.device.type != "cuda":
                return None
            self.streams = CudaStreams()
        return self.streams if self.streams.is_device(t) else None

    def _allocate(self, nbytes: int) -> _Extent:
        return self.pool.alloc(nbytes)

    def _release(self, storage: _Extent) -> None:
        self.pool.free(storage)

    def _close_storage(self) -> None:
        self.pool.close()

    def _start_write(self, storage: _Extent, src: torch.Tensor, deadline: float, ready: Any) -> TransferHandle:
        return self._copy([(self.pool.view(storage, src.numel()), src)], TransferKind.OFFLOAD, deadline)

    def _start_read(self, storage: _Extent, dst: torch.Tensor, deadline: float, ready: Any) -> TransferHandle:
        return self._copy([(dst, self.pool.view(storage, dst.numel()))], TransferKind.PREFETCH, deadline)

    def _start_pack(self, storage: _Extent, pieces: List[Tuple[int, torch.Tensor]], write: bool) -> TransferHandle:
        return self._copy(self._pack_pairs(storage, pieces, write),
                          TransferKind.OFFLOAD if write else TransferKind.PREFETCH, math.inf)

    def _ordered(self, storage: _Extent, pieces: List[Tuple[int, torch.Tensor]], write: bool, streams: Streams,
                 waits: List[Any], what: str) -> TransferHandle:
        pairs = self._pack_pairs(storage, pieces, write)
        device = pieces[0][1].device
        stream = streams.side(device, OUT if write else IN)
        for event in waits:
            streams.wait(stream, event)
        for dst, src in pairs:
            streams.copy(stream, dst, src)
        return StreamHandle(what, sum(t.numel() for _, t in pieces), streams, streams.record(stream), device)

    def _pack_pairs(self, storage: _Extent, pieces: List[Tuple[int, torch.Tensor]],
                    write: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(dst, src) byte tensors of a pack's copies: tensors into the slot, or its parts out."""
        end = max(offset + t.numel() for offset, t in pieces)
        whole = self.pool.view(storage, end)
        parts = [(whole[offset:offset + t.numel()], t) for offset, t in pieces]
        return parts if write else [(t, part) for part, t in parts]

    def _copy(self, pairs: List[Tuple[torch.Tensor, torch.Tensor]], kind: TransferKind, deadline: float) -> TransferHandle:
        # A host copy is one torch copy_ per tensor (itself parallel over the intra-op threads). A
        # caller that waits for it while it is still queued runs it on its own thread (Note [help
        # while waiting]), which saves the worker's wake-up: as long as an 8 MiB copy on a busy machine.
        nbytes = sum(src.numel() for _, src in pairs)

        def run(ctx: WorkerContext) -> None:
            for dst, src in pairs:
                dst.copy_(src)

        if nbytes <= SMALL_COPY_BYTES:  # Note [small copies run here] (in the scheduler)
            done = self.scheduler.run_here(self.name, run, nbytes=nbytes)
            if done is not None:
                return TransferHandle.gather(f"{self.name} copy", nbytes, [done])
        future = self.scheduler.submit(self.name, run, kind=kind, deadline=deadline, nbytes=nbytes, inline=True)
        return TransferHandle.gather(f"{self.name} copy", nbytes, [future],
                                     lambda: self.scheduler.run_inline(future))

