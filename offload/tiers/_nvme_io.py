"""Raw I/O for the nvme tier: swap files, the byte movers (POSIX, DeepSpeed aio, kvikio), checksums.

A *raw I/O* moves one chunk between an aligned host buffer and a file offset, blocking the worker
thread that calls it (the scheduler bounds how many run). ``PosixIO`` is always available;
``DeepSpeedAIO`` uses DeepSpeed's async_io op where it builds; ``KvikioIO`` moves CUDA memory with
GPUDirect Storage (or kvikio's compat mode) and is used only after :func:`probe_kvikio` succeeded,
because kvikio needs the CUDA driver even to start.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import zlib
from typing import Any, Callable, Optional, Tuple

import torch
import xxhash

from tierflow.offload.core.errors import TierIOError
from tierflow.offload.core.units import PAGE_BYTES

__all__ = ["DeepSpeedAIO", "KvikioIO", "PosixIO", "SwapFile", "checksum_fn", "probe_direct_io", "probe_kvikio"]


class SwapFile:
    """One swap file (mode 0600), opened with O_DIRECT when ``direct``.

    Args:
        path: file to create; it must not exist.
        direct: open with O_DIRECT (buffers and offsets must then be page-aligned).
    """

    def __init__(self, path: str, direct: bool) -> None:
        self.path = path
        self.direct = direct
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | (os.O_DIRECT if direct else 0)
        self.fd = os.open(path, flags, 0o600)

    def allocate(self, offset: int, nbytes: int) -> None:
        """Reserve disk blocks for ``[offset, offset + nbytes)`` (raises OSError ENOSPC when full)."""
        os.posix_fallocate(self.fd, offset, nbytes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def probe_direct_io(directory: str) -> Optional[str]:
    """None when ``directory``'s filesystem accepts aligned O_DIRECT I/O, else the reason it does not."""
    path = os.path.join(directory, ".direct-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError as exc:
        return os.strerror(exc.errno or errno.EINVAL)
    try:
        buf = mmap.mmap(-1, PAGE_BYTES)
        os.pwrite(fd, buf, 0)
        os.preadv(fd, [buf], 0)
        return None
    except OSError as exc:
        return os.strerror(exc.errno or errno.EINVAL)
    finally:
        os.close(fd)
        os.unlink(path)


class PosixIO:
    """``pwrite``/``preadv`` on the swap file's descriptor (the GIL is released during the call)."""

    name = "posix"

    def write(self, ctx: Any, file: SwapFile, buf: torch.Tensor, offset: int) -> None:
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            done += os.pwrite(file.fd, view[done:], offset + done)

    def read(self, ctx: Any, file: SwapFile, buf: torch.Tensor, offset: int) -> None:
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(file.fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"unexpected end of file after {done} of {len(view)} bytes")
            done += got


class DeepSpeedAIO:
    """DeepSpeed's async_io op (libaio) as the byte mover for host buffers.

    One aio handle per worker thread (handles are not shared across threads). The op opens the
    file by name for every call, with O_DIRECT, so buffers must be page-aligned: the tier
    guarantees that by staging unaligned chunks.

    Raises:
        TierIOError: at construction when the op does not build or load here.
    """

    name = "deepspeed_aio"

    def __init__(self, block_bytes: int, queue_depth: int, probe_dir: str) -> None:
        try:
            # deepspeed is optional (the deepspeed extra) and slow to import: only when its kernels are asked for.
            from deepspeed.ops.op_builder import AsyncIOBuilder

            builder = AsyncIOBuilder()
            if not builder.is_compatible(verbose=False):
                raise RuntimeError("AsyncIOBuilder reports it is not compatible (libaio headers missing? apt-get install libaio-dev)")
            self._module = builder.load(verbose=False)
            self._block_bytes = block_bytes
            self._queue_depth = queue_depth
            self._probe(probe_dir)
        except Exception as exc:  # an optional native op: any failure means "not available here"
            raise TierIOError(f"tiers.nvme.backend=deepspeed_aio is not available: {exc}; use tiers.nvme.backend=posix") from None

    def _probe(self, directory: str) -> None:
        """One 4 KiB round trip on this thread, before any worker uses the op.

        Note [deepspeed aio warm-up]: the op's first write logs a warning from inside a
        ``std::call_once`` while holding the GIL; two threads making their first write at once
        deadlock (one waits in call_once holding the GIL, the other waits for the GIL inside it).
        Doing the first write here, alone, runs that once-block before there is any concurrency.
        """

        path = os.path.join(directory, ".deepspeed-aio-probe")
        buf = torch.frombuffer(mmap.mmap(-1, PAGE_BYTES), dtype=torch.uint8)
        buf.copy_(torch.arange(PAGE_BYTES, dtype=torch.int64).remainder(251).to(torch.uint8))
        out = torch.frombuffer(mmap.mmap(-1, PAGE_BYTES), dtype=torch.uint8)
        handle = self._module.aio_handle(self._block_bytes, self._queue_depth, False, True, 1)
        try:
            with open(path, "wb"):
                pass
            if handle.sync_pwrite(buf, path, 0) < 0 or handle.sync_pread(out, path, 0) < 0 or not torch.equal(buf, out):
                raise RuntimeError("its probe round trip failed")
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def _handle(self, ctx: Any) -> Any:
        return ctx.local(("deepspeed-aio", id(self)), lambda: self._module.aio_handle(
            self._block_bytes, self._queue_depth, False, True, 1))

    def write(self, ctx: Any, file: SwapFile, buf: torch.Tensor, offset: int) -> None:
        if self._handle(ctx).sync_pwrite(buf, file.path, offset) < 0:
            raise OSError(errno.EIO, f"deepspeed aio write of {buf.numel()} bytes at offset {offset} failed")

    def read(self, ctx: Any, file: SwapFile, buf: torch.Tensor, offset: int) -> None:
        if self._handle(ctx).sync_pread(buf, file.path, offset) < 0:
            raise OSError(errno.EIO, f"deepspeed aio read of {buf.numel()} bytes at offset {offset} failed")


class KvikioIO:
    """kvikio ``CuFile`` for CUDA memory: GPUDirect Storage, or kvikio's POSIX compat mode."""

    name = "kvikio"

    def __init__(self) -> None:
        # kvikio is optional (the gds extra, GPU machines): only when the kvikio backend is probed.
        import kvikio

        self._kvikio = kvikio
        self._files: dict = {}
        self._lock = threading.Lock()

    def _cufile(self, file: SwapFile) -> Any:
        with self._lock:
            handle = self._files.get(file.path)
            if handle is None:
                handle = self._files[file.path] = self._kvikio.CuFile(file.path, "r+")
        return handle

    def write(self, ctx: Any, file: SwapFile, buf: torch.Tensor, offset: int) -> None:
        written = self._cufile(file).pwrite(buf, buf.numel(), offset).get()
        if written != buf.numel():
            raise OSError(errno.EIO, f"kvikio wrote {written} of {buf.numel()} bytes")

    def read(self, ctx: Any, file: SwapFile, buf: torch.Tensor, offset: int) -> None:
        got = self._cufile(file).pread(buf, buf.numel(), offset).get()
        if got != buf.numel():
            raise OSError(errno.EIO, f"kvikio read {got} of {buf.numel()} bytes")

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def probe_kvikio(directory: str) -> Tuple[Optional[KvikioIO], str]:
    """Try a 4 KiB round trip of a CUDA tensor through kvikio in ``directory``.

    Returns:
        ``(KvikioIO, "")`` when it works, else ``(None, reason)``.
    """
    if not torch.cuda.is_available():
        return None, "no CUDA device (kvikio needs the CUDA driver)"
    try:
        io = KvikioIO()
    except Exception as exc:  # not installed, or its CUDA libraries do not load
        return None, f"kvikio does not import ({exc}); pip install kvikio-cu12"
    path = os.path.join(directory, ".kvikio-probe")
    try:
        probe = SwapFile(path, direct=False)
        try:
            src = torch.arange(PAGE_BYTES, dtype=torch.uint8, device="cuda")
            out = torch.zeros_like(src)
            io.write(None, probe, src, 0)
            io.read(None, probe, out, 0)
            if not torch.equal(src, out):
                return None, "kvikio probe read back different bytes"
            return io, ""
        finally:
            io.close()
            probe.close()
            os.unlink(path)
    except Exception as exc:
        return None, f"kvikio probe failed: {exc}"


def checksum_fn(kind: str) -> Optional[Callable[[torch.Tensor], int]]:
    """The per-chunk digest for ``tiers.nvme.checksum`` (None for ``none``); xxhash is a dependency."""
    if kind == "none":
        return None
    if kind == "crc32":
        return lambda buf: zlib.crc32(memoryview(buf.numpy()))
    return lambda buf: xxhash.xxh3_64_intdigest(memoryview(buf.numpy()))
