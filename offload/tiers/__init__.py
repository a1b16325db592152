"""Storage tiers behind one interface: the host pool, NUMA/CXL memory and NVMe swap files.

``slot = tier.reserve(n)``, ``tier.write(slot, t)`` / ``tier.read(slot, out)`` return handles, then
``tier.free(slot)``. :class:`TierEngine` opens the tiers a :class:`TiersConfig` asks for, over one
:class:`TransferScheduler`. Calibration measures the links into a
:class:`~tierflow.offload.core.HardwareModel`; capacity checks refuse what the node's RAM cannot
hold. Private modules (``_memory``, ``_pool``, ``_nvme_io``, ``_cuda``) are private to this package:
other packages use the names re-exported here.
"""

from tierflow.offload.tiers._memory import (
    ExtentAllocator,
    MappedMemory,
    aligned_empty,
    map_large_allocations,
    trim_freed_memory,
)
from tierflow.offload.tiers._pool import PooledTier, SlabPool
from tierflow.offload.tiers.base import Slot, Tier, TransferHandle
from tierflow.offload.tiers.calibrate import CalibrationPlan, calibrate, measure_link
from tierflow.offload.tiers.capacity import HostDemand, check_host_memory, host_demand, ranks_on_this_node
from tierflow.offload.tiers.config import HostTierConfig, NumaTierConfig, NvmeTierConfig, SchedulerConfig, TiersConfig
from tierflow.offload.tiers.engine import TierEngine
from tierflow.offload.tiers.host import HostTier
from tierflow.offload.tiers.numa import NumaNode, NumaTier, discover_numa_nodes, mbind, numa_placement
from tierflow.offload.tiers.nvme import NvmeTier
from tierflow.offload.tiers.scheduler import LinkStats, TransferKind, TransferScheduler, WorkerContext

__all__ = [
    "CalibrationPlan",
    "ExtentAllocator",
    "HostDemand",
    "HostTier",
    "HostTierConfig",
    "LinkStats",
    "MappedMemory",
    "NumaNode",
    "NumaTier",
    "NumaTierConfig",
    "NvmeTier",
    "NvmeTierConfig",
    "PooledTier",
    "SchedulerConfig",
    "SlabPool",
    "Slot",
    "Tier",
    "TierEngine",
    "TiersConfig",
    "TransferHandle",
    "TransferKind",
    "TransferScheduler",
    "WorkerContext",
    "aligned_empty",
    "calibrate",
    "check_host_memory",
    "discover_numa_nodes",
    "host_demand",
    "mbind",
    "measure_link",
    "numa_placement",
    "ranks_on_this_node",
    "map_large_allocations",
    "trim_freed_memory",
]
