"""The few CUDA calls the tiers need, in one place so CPU-only code never touches CUDA.

Host memory is registered with ``cudaHostRegister`` through ``torch.cuda.cudart()`` (no extra
dependency): the pool is pinned once per slab rather than per tensor, which is what keeps pinned
memory from doubling through the caching host allocator's power-of-two rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from tierflow.offload.core.errors import TierError

__all__ = ["available", "copy_on_worker_stream", "ready_event", "register_host", "unregister_host"]

_HOST_REGISTER_PORTABLE = 1  # visible to every CUDA context, not only the current device's


def available() -> bool:
    """True when a CUDA device can be used."""
    return torch.cuda.is_available()


def register_host(address: int, nbytes: int) -> None:
    """Page-lock ``[address, address + nbytes)`` for DMA.

    Raises:
        TierError: with the CUDA error code and what to try.
    """
    err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _HOST_REGISTER_PORTABLE))
    if err != 0:
        raise TierError(
            f"cudaHostRegister of {nbytes} bytes failed with cudaError {err}; the machine may be out of "
            f"lockable memory: lower the tier's budget_bytes, or set its pin=off to keep slabs pageable"
        )


def unregister_host(address: int) -> None:
    err = int(torch.cuda.cudart().cudaHostUnregister(address))
    if err != 0:
        raise AssertionError(f"cudaHostUnregister failed with cudaError {err}")


def ready_event(t: torch.Tensor) -> Any:
    """An event recorded now on ``t``'s current stream: work queued so far that produces ``t``.

    The worker that copies ``t`` waits on it, so an offload issued right after the kernel that
    wrote ``t`` never reads it early (and the caller never has to synchronise).
    """
    if t.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return event


def copy_on_worker_stream(stream: Any, ready: Any, copy: Callable[[], None]) -> None:
    """Run ``copy()`` on ``stream`` after ``ready`` and block this (worker) thread until it is done.

    Blocking here is what bounds the copies in flight per link to the scheduler's limit; the
    caller's thread never blocks.
    """
    with torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        copy()
    done = torch.cuda.Event()
    done.record(stream)
    done.synchronize()
