"""Page-aligned memory and the extent allocator shared by the host pool, NUMA slabs and swap files.

Memory comes from anonymous ``mmap`` (page-aligned, so it is valid for O_DIRECT, ``mbind`` and
``cudaHostRegister`` alike) and is exposed as a uint8 tensor over the mapping without a copy.
Slots are carved out with a best-fit extent allocator whose size classes are multiples of one
page: a 33 MiB tensor takes 33 MiB, not the 64 MiB a power-of-two caching allocator would give it
(MemAscend's observation), and freed neighbours coalesce so the pool does not fragment into
unusable slivers.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from typing import Callable, Dict, List, Optional, Tuple

import torch

from tierflow.offload.core.units import PAGE_BYTES, align_up
from tierflow.offload.tiers import _cuda

__all__ = ["ExtentAllocator", "MappedMemory", "aligned_empty", "trim_freed_memory"]


class ExtentAllocator:
    """Best-fit allocation of byte ranges inside ``[0, size)``, in multiples of ``alignment``.

    Not thread-safe: the owner serialises calls.

    Example:
        >>> a = ExtentAllocator(1 << 20)
        >>> a.alloc(5000), a.alloc(4096)
        (0, 8192)
        >>> a.free(0, 5000); a.alloc(8192)
        0
    """

    def __init__(self, size: int = 0, alignment: int = PAGE_BYTES) -> None:
        self.alignment = alignment
        self.size = 0
        self._by_start: Dict[int, int] = {}  # start -> length of each free extent
        self._by_end: Dict[int, int] = {}  # end -> start
        self._by_length: List[Tuple[int, int]] = []  # sorted (length, start)
        self.free_bytes = 0
        if size:
            self.grow(size)

    def alloc(self, nbytes: int) -> Optional[int]:
        """Offset of a free extent of ``align_up(nbytes)`` bytes, or None when none is large enough."""
        need = align_up(nbytes, self.alignment)
        i = bisect.bisect_left(self._by_length, (need, -1))
        if i == len(self._by_length):
            return None
        length, start = self._by_length[i]
        self._remove(start, length)
        if length > need:
            self._insert(start + need, length - need)
        self.free_bytes -= need
        return start

    def free(self, offset: int, nbytes: int) -> None:
        """Return an extent, merging it with free neighbours."""
        length = align_up(nbytes, self.alignment)
        if offset < 0 or offset + length > self.size or offset in self._by_start:
            raise AssertionError(f"free of [{offset}, {offset + length}) outside the allocated space")
        self.free_bytes += length
        start, end = offset, offset + length
        before = self._by_end.get(start)
        if before is not None:
            self._remove(before, start - before)
            start = before
        after = self._by_start.get(end)
        if after is not None:
            self._remove(end, after)
            end += after
        self._insert(start, end - start)

    def alloc_growing(self, nbytes: int) -> int:
        """Like :meth:`alloc`, but grow the space at the end when nothing fits (a swap file)."""
        offset = self.alloc(nbytes)
        if offset is None:
            need = align_up(nbytes, self.alignment)
            tail_start = self._by_end.get(self.size)
            tail = self.size - tail_start if tail_start is not None else 0
            self.grow(need - tail)  # the grown tail merges with the free tail before it
            offset = self.alloc(need)
            if offset is None:
                raise AssertionError("grown space does not fit the request")
        return offset

    def grow(self, nbytes: int) -> None:
        """Append ``nbytes`` of free space at the end (a swap file growing)."""
        add = align_up(nbytes, self.alignment)
        old = self.size
        self.size += add
        self.free(old, add)

    @property
    def largest_free(self) -> int:
        return self._by_length[-1][0] if self._by_length else 0

    def _insert(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        bisect.insort(self._by_length, (length, start))

    def _remove(self, start: int, length: int) -> None:
        del self._by_start[start]
        del self._by_end[start + length]
        self._by_length.pop(bisect.bisect_left(self._by_length, (length, start)))


class MappedMemory:
    """``nbytes`` of page-aligned anonymous memory, optionally NUMA-bound and CUDA-registered.

    Args:
        nbytes: size (rounded up to a page).
        bind: called as ``bind(address, nbytes)`` before the first touch, so pages are placed by
            its policy (``mbind``); None leaves placement to the kernel.
        pin: register with ``cudaHostRegister`` (needs CUDA) so copies to and from it are DMA.

    Raises:
        TierError: when registration fails.
    """

    def __init__(self, nbytes: int, *, bind: Optional[Callable[[int, int], None]] = None, pin: bool = False) -> None:
        self.nbytes = align_up(nbytes)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if bind is None:
            flags |= getattr(mmap, "MAP_POPULATE", 0)  # fault in now: the cost is paid once, here
        self._mm: Optional[mmap.mmap] = mmap.mmap(-1, self.nbytes, flags=flags)
        self.tensor: Optional[torch.Tensor] = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.address = self.tensor.data_ptr()
        self.pinned = False
        try:
            if bind is not None:
                bind(self.address, self.nbytes)
                self.tensor.zero_()  # first touch after mbind: pages land on the bound node(s)
            if pin:
                _cuda.register_host(self.address, self.nbytes)
                self.pinned = True
        except BaseException:
            self.close()
            raise

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over ``[offset, offset + nbytes)`` (shares memory)."""
        if self.tensor is None:
            raise AssertionError("view of closed memory")
        return self.tensor[offset:offset + nbytes]

    def close(self) -> None:
        """Unregister and unmap. Idempotent."""
        if self.pinned:
            _cuda.unregister_host(self.address)
            self.pinned = False
        self.tensor = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes when it does
            self._mm = None


def aligned_empty(nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A page-aligned CPU tensor of ``nbytes`` bytes (uninitialised contents are zeros).

    O_DIRECT can read into and write from such a tensor without a bounce buffer; torch's own CPU
    allocator aligns to 64 bytes only. The memory is unmapped when the tensor is garbage collected.

    Example:
        >>> t = aligned_empty(8192, torch.float32)
        >>> t.numel(), t.data_ptr() % 4096
        (2048, 0)
    """
    size = dtype.itemsize  # no allocation: a traced step would see one
    if nbytes <= 0 or nbytes % size:
        raise ValueError(f"aligned_empty(nbytes={nbytes}) needs a positive multiple of the {dtype} element size {size}")
    mm = mmap.mmap(-1, align_up(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mm, dtype=torch.uint8)[:nbytes].view(dtype)


_libc: Optional[ctypes.CDLL] = None


_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def map_large_allocations(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc map every allocation of ``threshold_bytes`` or more on its own, for good.

    Setting the threshold explicitly also stops glibc from raising it (see
    :func:`trim_freed_memory`), so a freed tensor of that size goes straight back to the OS and
    RSS follows what is live: what a CPU run whose "device" is RAM needs for its budget to mean
    resident memory. Each such allocation then costs an ``mmap`` and fresh zeroed pages (cheap
    next to the NVMe I/O such a run does). A no-op (returns False) where the C library is not glibc.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        return bool(_libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def trim_freed_memory() -> bool:
    """Give the OS back the heap memory freed tensors left behind, so RSS follows what is live.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); blocks below
    it then come from the heap and stay resident after they are freed. Streaming a model through
    memory one tensor at a time grows RSS towards the model's size unless the heap is trimmed
    (measured: 60 MiB of growth for a 70 MiB model without it). ``malloc_trim`` returns every free
    page of every arena; it costs well under a millisecond per call here. A no-op (returns False)
    where the C library is not glibc.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        return bool(_libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
