"""Raw byte views of tensor storages, for the tiers to copy from and into."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["alias_bytes"]


def alias_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """The whole storage as a flat uint8 tensor that aliases its memory without owning it.

    Note [alias, not share]: the tensor handed to a tier views the storage's memory through a
    separate, non-owning storage object, for two reasons. (1) The tier's transfer closures can
    outlive the transfer (a worker thread keeps its last task until it takes the next one; a copy
    run by a waiting caller stays queued until a worker skips it): a view that owned the model's
    storage would keep a saved activation alive after autograd let go of it, and the device would
    hold it past its last use (the tracer saw exactly that). (2) NVMe I/O hands its buffer to
    numpy, which marks that storage non-resizable for good; the model's storage must stay
    resizable (Note [storage swap]). It is safe because the residency entry holds the real
    storage until every transfer on it has finished (``arrive`` and ``discard`` wait), the
    storage is never resized while one is in flight, and a stale closure never runs again.
    """
    n = storage.nbytes()
    if storage.device.type == "cuda":
        return torch.as_tensor(_CudaBytes(storage.data_ptr(), n), device=storage.device)
    raw = (ctypes.c_uint8 * n).from_address(storage.data_ptr())
    return torch.frombuffer(raw, dtype=torch.uint8)


class _CudaBytes:
    """``n`` bytes of device memory at ``ptr`` through ``__cuda_array_interface__`` (no ownership)."""

    def __init__(self, ptr: int, n: int) -> None:
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False), "version": 2}
