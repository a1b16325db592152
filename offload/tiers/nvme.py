"""The nvme tier: swap files on one or more SSD directories, chunked, striped and checksummed.

Each configured directory gets a private ``0700`` subdirectory holding one ``0600`` swap file;
everything is removed at close unless ``keep_files``. A slot of N bytes is cut into
``chunk_bytes`` chunks dealt round-robin over the directories (MLP-Offload's multi-path: two SSDs
serve one tensor at once), each directory's share in one extent of its file. Every chunk is one
task on its directory's scheduler link, so ``io_depth`` chunks per directory are in flight.

Note [aligned or staged]: O_DIRECT needs page-aligned memory and lengths. Page-aligned CPU tensors
(host pool slots, :func:`~tierflow.offload.aligned_empty`) are written and read in place; anything else,
and the unaligned tail of a tensor, goes through a per-worker bounce buffer of ``chunk_bytes``
(the bytes staged: ``io_depth * chunk_bytes`` per directory). CUDA tensors use kvikio when its
probe succeeded, else the same bounce buffers (pinned) with a copy on the worker's CUDA stream.

Note [full disk]: with ``preallocate`` (the default) a slot's disk blocks are reserved with
``fallocate`` inside :meth:`reserve`, so a full disk raises TierFullError before any byte moves and
earlier slots are untouched. Without it, the failing write's handle raises TierIOError, that slot
is marked invalid, and the others stay readable.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from tierflow.offload.core.errors import ChecksumError, TierConfigError, TierFullError, TierIOError
from tierflow.offload.core.units import PAGE_BYTES, align_up, format_bytes
from tierflow.offload.tiers import _cuda
from tierflow.offload.tiers._memory import ExtentAllocator, MappedMemory
from tierflow.offload.tiers._nvme_io import DeepSpeedAIO, PosixIO, SwapFile, checksum_fn, probe_direct_io, probe_kvikio
from tierflow.offload.tiers.base import Tier, TransferHandle
from tierflow.offload.tiers.config import NvmeTierConfig
from tierflow.offload.tiers.scheduler import TransferKind, TransferScheduler, WorkerContext

__all__ = ["NvmeTier"]


@dataclass(frozen=True)
class _Chunk:
    index: int
    directory: int
    file_offset: int
    start: int  # first byte of the tensor in this chunk
    length: int  # tensor bytes in this chunk
    disk_length: int  # bytes on disk (page-rounded)


class _NvmeSlot:
    __slots__ = ("chunks", "extents", "digests")

    def __init__(self, chunks: Tuple[_Chunk, ...], extents: List[Tuple[int, int, int]]) -> None:
        self.chunks = chunks
        self.extents = extents  # (directory, offset, nbytes) reserved in each swap file
        self.digests: List[Optional[int]] = [None] * len(chunks)


class _Directory:
    def __init__(self, index: int, root: str, private: str, file: SwapFile) -> None:
        self.index = index
        self.root = root
        self.private = private
        self.file = file
        self.space = ExtentAllocator()
        self.link = f"nvme:{index}"


class NvmeTier(Tier):
    """Swap files on NVMe directories behind the Tier interface.

    Args:
        config: directories, chunking, O_DIRECT, checksums, backend.
        scheduler: shared scheduler; the tier makes its own when None.
        raw_io: the host byte mover (tests pass a fault-injecting one); default from ``config.backend``.

    Raises:
        TierConfigError: every directory problem at once (missing, not a directory, not writable,
            no O_DIRECT with ``direct=on``), or an unavailable backend; nothing is left behind.
    """

    kind = "nvme"

    def __init__(self, config: NvmeTierConfig, scheduler: Optional[TransferScheduler] = None,
                 *, raw_io: Any = None) -> None:
        if not config.dirs:
            raise TierConfigError(f"{config.KEY}.dirs is empty; give at least one directory, e.g. {config.KEY}.dirs=[/mnt/nvme0]")
        self.config = config
        self._digest = checksum_fn(config.checksum)
        self._dirs = self._open_directories(config)
        try:
            self._host_io = raw_io if raw_io is not None else self._host_backend(config, self._dirs[0].private)
            self._device_io, self.device_path = self._device_backend(config, self._dirs[0].private)
        except BaseException:
            self._remove_directories()
            raise
        # A forgotten close still removes the swap files: at garbage collection or interpreter exit.
        self._finalizer = weakref.finalize(self, _remove_trees, [d.private for d in self._dirs], config.keep_files)
        super().__init__("nvme", scheduler)
        for d in self._dirs:
            self.scheduler.register_link(d.link, config.io_depth)
        self._space_lock = threading.Lock()
        self._used = 0
        self._cursor = 0
        self._capacity = config.budget_bytes if config.budget_bytes is not None else self._free_disk_bytes()
        self._pin_bounce = _cuda.available()

    # --- capacity -----------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def directories(self) -> List[str]:
        """The private swap directories, one per configured directory."""
        return [d.private for d in self._dirs]

    @property
    def swap_files(self) -> List[str]:
        return [d.file.path for d in self._dirs]

    # --- storage ------------------------------------------------------------------------------

    def _allocate(self, nbytes: int) -> _NvmeSlot:
        chunk_bytes = self.config.chunk_bytes
        need = align_up(nbytes)
        with self._space_lock:
            if self._used + need > self._capacity:
                setting = f"{self.config.KEY}.budget_bytes"
                what = (f"its budget {format_bytes(self._capacity)} ({setting}={self._capacity})"
                        if self.config.budget_bytes is not None else
                        f"the {format_bytes(self._capacity)} free in its directories when it opened ({setting}=null)")
                raise TierFullError(f"nvme tier is full: reserving {format_bytes(need)} would hold "
                                    f"{format_bytes(self._used + need)} of {what}; raise {setting}, free disk "
                                    f"space or add a directory to {self.config.KEY}.dirs, or free slots first")
            first = self._cursor
            self._cursor = (self._cursor + 1) % len(self._dirs)
            spans = []  # (index, directory, start, length)
            for index, start in enumerate(range(0, need, chunk_bytes)):
                spans.append((index, (first + index) % len(self._dirs), start, min(chunk_bytes, need - start)))
            share: Dict[int, int] = {}
            for _, d, _, length in spans:
                share[d] = share.get(d, 0) + length
            extents: List[Tuple[int, int, int]] = []
            try:
                for d, length in share.items():
                    extents.append((d, self._take_extent(self._dirs[d], length), length))
            except BaseException:
                for d, offset, length in extents:
                    self._dirs[d].space.free(offset, length)
                    if self.config.preallocate:
                        _punch_hole(self._dirs[d].file, offset, length)
                raise
            self._used += need
        cursor = {d: offset for d, offset, _ in extents}
        chunks = []
        for index, d, start, disk_length in spans:
            chunks.append(_Chunk(index, d, cursor[d], start, max(0, min(disk_length, nbytes - start)), disk_length))
            cursor[d] += disk_length
        return _NvmeSlot(tuple(chunks), extents)

    def _take_extent(self, directory: _Directory, nbytes: int) -> int:
        offset = directory.space.alloc_growing(nbytes)
        if self.config.preallocate:
            try:
                directory.file.allocate(offset, nbytes)
            except OSError as exc:
                directory.space.free(offset, nbytes)
                _punch_hole(directory.file, offset, nbytes)  # posix_fallocate may have taken part of it
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise TierFullError(
                        f"nvme tier: {directory.root} is out of disk space for a {format_bytes(nbytes)} share of a slot "
                        f"({os.strerror(exc.errno)}); free space there, add a directory to {self.config.KEY}.dirs, "
                        f"or set {self.config.KEY}.budget_bytes below the free space") from None
                raise TierIOError(f"nvme tier: reserving {format_bytes(nbytes)} in {directory.file.path} failed: "
                                  f"{os.strerror(exc.errno or errno.EIO)}") from None
        return offset

    def _release(self, storage: _NvmeSlot) -> None:
        with self._space_lock:
            for d, offset, length in storage.extents:
                # The blocks stay allocated (the file never outgrows the budget's high-water mark):
                # rewriting written blocks is cheaper than converting fresh unwritten extents.
                self._dirs[d].space.free(offset, length)
                self._used -= length

    def _close_storage(self) -> None:
        close = getattr(self._device_io, "close", None)
        if close is not None:
            close()
        self._remove_directories()

    # --- transfers ----------------------------------------------------------------------------

    def _start_write(self, storage: _NvmeSlot, src: torch.Tensor, deadline: float, ready: Any) -> TransferHandle:
        run = self._write_device_chunk if src.is_cuda else self._write_host_chunk
        return self._submit(storage, src, run, TransferKind.OFFLOAD, deadline, ready, "write")

    def _start_read(self, storage: _NvmeSlot, dst: torch.Tensor, deadline: float, ready: Any) -> TransferHandle:
        run = self._read_device_chunk if dst.is_cuda else self._read_host_chunk
        return self._submit(storage, dst, run, TransferKind.PREFETCH, deadline, ready, "read")

    def _submit(self, slot: _NvmeSlot, tensor: torch.Tensor, run: Callable, kind: TransferKind, deadline: float,
                ready: Any, op: str) -> TransferHandle:
        futures = []
        for chunk in slot.chunks:
            if chunk.length == 0:
                continue
            piece = tensor[chunk.start:chunk.start + chunk.length]
            task = _bind(run, slot, chunk, piece, ready, op, self)
            futures.append(self.scheduler.submit(self._dirs[chunk.directory].link, task, kind=kind,
                                                 deadline=deadline, nbytes=chunk.length))
        return TransferHandle.gather(f"nvme {op}", tensor.numel(), futures)

    def _bounce(self, ctx: WorkerContext) -> torch.Tensor:
        memory = ctx.local(("nvme-bounce", self.config.chunk_bytes, self._pin_bounce),
                           lambda: MappedMemory(self.config.chunk_bytes, pin=self._pin_bounce))
        return memory.tensor

    def _in_place(self, piece: torch.Tensor, chunk: _Chunk) -> bool:
        """Note [aligned or staged]: can O_DIRECT use ``piece``'s own memory?"""
        file = self._dirs[chunk.directory].file
        return not file.direct or (piece.data_ptr() % PAGE_BYTES == 0 and chunk.length == chunk.disk_length)

    def _write_host_chunk(self, ctx: WorkerContext, slot: _NvmeSlot, chunk: _Chunk, piece: torch.Tensor, ready: Any) -> None:
        file = self._dirs[chunk.directory].file
        if self._in_place(piece, chunk):
            buf = piece
        else:
            buf = self._bounce(ctx)[:chunk.disk_length]
            buf[:chunk.length].copy_(piece)
            buf[chunk.length:].zero_()
        self._record_digest(slot, chunk, buf[:chunk.length])
        self._host_io.write(ctx, file, buf if file.direct else buf[:chunk.length], chunk.file_offset)

    def _read_host_chunk(self, ctx: WorkerContext, slot: _NvmeSlot, chunk: _Chunk, piece: torch.Tensor, ready: Any) -> None:
        file = self._dirs[chunk.directory].file
        if self._in_place(piece, chunk):
            self._verify(slot, chunk, _reader(self._host_io, ctx, file, piece, chunk.file_offset, piece))
            return
        buf = self._bounce(ctx)[:chunk.disk_length]
        self._verify(slot, chunk, _reader(self._host_io, ctx, file, buf, chunk.file_offset, buf[:chunk.length]))
        piece.copy_(buf[:chunk.length])

    def _write_device_chunk(self, ctx: WorkerContext, slot: _NvmeSlot, chunk: _Chunk, piece: torch.Tensor, ready: Any) -> None:
        file = self._dirs[chunk.directory].file
        if self._device_io is not None:  # GPUDirect Storage (or kvikio compat mode)
            ready.synchronize()
            if self._digest is not None:
                self._record_digest(slot, chunk, piece.cpu())
            self._device_io.write(ctx, file, piece, chunk.file_offset)
            return
        buf = self._bounce(ctx)[:chunk.disk_length]
        _cuda.copy_on_worker_stream(ctx.cuda_stream(piece.device), ready,
                                    lambda: buf[:chunk.length].copy_(piece, non_blocking=True))
        buf[chunk.length:].zero_()
        self._record_digest(slot, chunk, buf[:chunk.length])
        self._host_io.write(ctx, file, buf if file.direct else buf[:chunk.length], chunk.file_offset)

    def _read_device_chunk(self, ctx: WorkerContext, slot: _NvmeSlot, chunk: _Chunk, piece: torch.Tensor, ready: Any) -> None:
        file = self._dirs[chunk.directory].file
        if self._device_io is not None:
            ready.synchronize()
            self._verify(slot, chunk, _reader(self._device_io, ctx, file, piece, chunk.file_offset, piece,
                                              to_host=self._digest is not None))
            return
        buf = self._bounce(ctx)[:chunk.disk_length]
        self._verify(slot, chunk, _reader(self._host_io, ctx, file, buf if file.direct else buf[:chunk.length],
                                          chunk.file_offset, buf[:chunk.length]))
        _cuda.copy_on_worker_stream(ctx.cuda_stream(piece.device), ready,
                                    lambda: piece.copy_(buf[:chunk.length], non_blocking=True))

    def _record_digest(self, slot: _NvmeSlot, chunk: _Chunk, data: torch.Tensor) -> None:
        if self._digest is not None:
            slot.digests[chunk.index] = self._digest(data)

    def _verify(self, slot: _NvmeSlot, chunk: _Chunk, read: Callable[[], torch.Tensor]) -> None:
        """Note [read twice before blaming the disk]: ``read()`` fills the buffer and returns the
        bytes to check. A chunk that fails its checksum is read once more: a transfer that went
        wrong passes the second time (with a warning); bytes changed on disk fail again, and the
        error names the tier, the file and the offset. The caller puts nothing it read in place
        (the residency table shrinks the storage back, so a parameter never holds those bytes)."""
        data = read()
        if self._digest is None:
            return
        expected = slot.digests[chunk.index]
        if self._digest(data) == expected:
            return
        file = self._dirs[chunk.directory].file
        where = f"chunk {chunk.index} ({chunk.length} bytes at offset {chunk.file_offset} of {file.path})"
        if self._digest(read()) == expected:
            warnings.warn(f"nvme tier: {where} failed its {self.config.checksum} checksum once and passed when read "
                          "again: the disk or its driver returned bad data", stacklevel=2)
            return
        raise ChecksumError(
            f"nvme tier: {where} fails its {self.config.checksum} checksum twice: the swap file was changed or "
            f"the disk holds bad data. Nothing read from it was used; resume from the last snapshot or "
            f"checkpoint (checkpoint=memory does so on restart), and check the disk (dmesg, smartctl)")

    # --- set-up and tear-down -----------------------------------------------------------------

    def _open_directories(self, config: NvmeTierConfig) -> List[_Directory]:
        problems, made = [], []
        key = config.KEY
        for i, root in enumerate(config.dirs):
            where = f"{key}.dirs[{i}]={root}"
            if not os.path.exists(root):
                problems.append(f"{where} does not exist; create it (mkdir -p {root}) or choose another directory")
                continue
            if not os.path.isdir(root):
                problems.append(f"{where} is not a directory")
                continue
            try:
                rank = os.environ.get("RANK")  # one private directory per process; the name shows whose
                prefix = f"tierflow-swap-rank{rank}-" if rank is not None else "tierflow-swap-"
                private = tempfile.mkdtemp(prefix=prefix, dir=root)  # mode 0700
            except OSError as exc:
                problems.append(f"{where} is not writable ({os.strerror(exc.errno or errno.EACCES)}); "
                                f"choose a directory you can write to")
                continue
            made.append((i, root, private))
        directories = []
        try:
            for i, root, private in made:
                if problems:
                    break
                reason = probe_direct_io(private) if config.direct != "off" else "disabled by direct=off"
                if reason is not None and config.direct == "on":
                    problems.append(f"{key}.dirs[{i}]={root} does not support O_DIRECT ({reason}); use a directory "
                                    f"on a local disk, or set {key}.direct=auto to fall back to buffered I/O")
                    continue
                if reason is not None and config.direct == "auto":
                    warnings.warn(f"{root} does not support O_DIRECT ({reason}); the nvme tier uses buffered I/O there, "
                                  f"which goes through the page cache and costs host memory", stacklevel=3)
                file = SwapFile(os.path.join(private, "swap.bin"), direct=reason is None)
                directories.append(_Directory(i, root, private, file))
        except OSError as exc:
            problems.append(f"{key}.dirs: creating a swap file failed: {exc}")
        if problems:
            for d in directories:
                d.file.close()
            for _, _, private in made:
                shutil.rmtree(private, ignore_errors=True)
            raise TierConfigError("; ".join(problems))
        return directories

    def _host_backend(self, config: NvmeTierConfig, probe_dir: str) -> Any:
        if config.backend == "deepspeed_aio":
            return DeepSpeedAIO(config.chunk_bytes, config.io_depth, probe_dir)
        return PosixIO()

    def _device_backend(self, config: NvmeTierConfig, probe_dir: str) -> Tuple[Any, str]:
        if config.backend in ("posix", "deepspeed_aio") or (config.backend == "auto" and not _cuda.available()):
            return None, "staged through pinned host buffers"
        io, reason = probe_kvikio(probe_dir)
        if io is not None:
            return io, "kvikio (GPUDirect Storage or its compat mode)"
        if config.backend == "kvikio":
            raise TierConfigError(f"{config.KEY}.backend=kvikio is not usable here: {reason}; use {config.KEY}.backend=auto")
        warnings.warn(f"kvikio unavailable ({reason}); CUDA tensors go to NVMe through pinned host buffers", stacklevel=3)
        return None, "staged through pinned host buffers"

    def _free_disk_bytes(self) -> int:
        seen, total = set(), 0
        for d in self._dirs:
            st = os.statvfs(d.private)
            device = os.stat(d.private).st_dev
            if device not in seen:  # two directories on one disk share its free space
                seen.add(device)
                total += st.f_bavail * st.f_frsize
        return total

    def _remove_directories(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        for d in getattr(self, "_dirs", []):
            d.file.close()
        _remove_trees([d.private for d in getattr(self, "_dirs", [])], self.config.keep_files)


def _remove_trees(paths: List[str], keep: bool) -> None:
    # Unlinking is safe even while a descriptor is open (I/O goes on to the orphaned inode), which
    # is why the finalizer removes files but leaves closing descriptors to close() or process exit.
    if not keep:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


def _reader(io: Any, ctx: WorkerContext, file: SwapFile, buf: torch.Tensor, offset: int, data: torch.Tensor,
            *, to_host: bool = False) -> Callable[[], torch.Tensor]:
    """A read of ``buf`` at ``offset`` that returns ``data`` (the bytes to check; a host copy of
    device memory when ``to_host``); it can run twice (Note [read twice before blaming the disk])."""
    def read() -> torch.Tensor:
        io.read(ctx, file, buf, offset)
        return data.cpu() if to_host else data
    return read


def _bind(run: Callable, slot: _NvmeSlot, chunk: _Chunk, piece: torch.Tensor, ready: Any, op: str,
          tier: NvmeTier) -> Callable[[WorkerContext], None]:
    """One chunk's task, turning OSError into a TierIOError that says where and what to do."""

    def task(ctx: WorkerContext) -> None:
        try:
            run(ctx, slot, chunk, piece, ready)
        except OSError as exc:
            d = tier._dirs[chunk.directory]
            advice = (f"free space in {d.root} or add a directory to {tier.config.KEY}.dirs"
                      if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk and the kernel log")
            raise TierIOError(f"nvme tier: {op} of chunk {chunk.index} ({chunk.length} bytes at offset "
                              f"{chunk.file_offset} of {d.file.path}) failed: {exc.strerror or exc}; {advice}") from exc

    return task


def _punch_hole(file: SwapFile, offset: int, nbytes: int) -> None:
    """Deallocate blocks (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE) where supported; harmless elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate(file.fd, 0x02 | 0x01, ctypes.c_long(offset), ctypes.c_long(nbytes))
    except (OSError, AttributeError):
        pass

