"""The host tier: a pinned pool of large slabs in local DRAM.

Slabs are anonymous mappings registered once with ``cudaHostRegister`` when CUDA is present (never
per-tensor ``pin_memory``, whose caching allocator rounds every block up to a power of two), sliced
into page-multiple slots. On a machine without CUDA the same pool is simply pageable.

Example:
    >>> import torch
    >>> from offload import HostTier, HostTierConfig
    >>> with HostTier(HostTierConfig(budget_bytes=1 << 20, slab_bytes=1 << 20)) as host:
    ...     t = torch.arange(10.0)
    ...     slot = host.reserve(t.nbytes)
    ...     host.write(slot, t).wait()
    ...     out = torch.empty_like(t)
    ...     host.read(slot, out).wait()
    ...     torch.equal(out, t)
    True
"""

from __future__ import annotations

from typing import Optional

from tierflow.offload.tiers import _cuda
from tierflow.offload.tiers._memory import MappedMemory
from tierflow.offload.tiers._pool import PooledTier, SlabPool
from tierflow.offload.tiers.config import HostTierConfig
from tierflow.offload.tiers.scheduler import TransferScheduler

__all__ = ["HostTier"]


class HostTier(PooledTier):
    """Pinned (or, without CUDA, pageable) host memory with a byte budget.

    Args:
        config: budget, slab size, pinning.
        scheduler: shared scheduler; the tier makes its own when None.

    Raises:
        TierFullError: from :meth:`reserve`, naming ``tiers.host.budget_bytes``.
    """

    kind = "host"

    def __init__(self, config: HostTierConfig, scheduler: Optional[TransferScheduler] = None) -> None:
        self.config = config
        self.pinned = config.pin == "auto" and _cuda.available()
        pool = SlabPool(tier="host", budget_bytes=config.budget_bytes, slab_bytes=config.slab_bytes,
                        budget_setting=f"{config.KEY}.budget_bytes",
                        make_slab=lambda n: MappedMemory(n, pin=self.pinned), preallocate=config.preallocate)
        super().__init__("host", pool, scheduler)
