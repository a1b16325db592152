"""Host-memory admission: will every rank on this node fit in its RAM with the tiers it asks for?

The complaint this answers (RESEARCH.md, #1): a host OOM-killed because pinned buffers and CPU-side
state were sized per process while eight processes share one machine. The check runs before any
tier is opened and refuses, with the numbers, a configuration that cannot fit; deciding is a pure
function of the sizes, so it is tested without allocating anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import psutil

from tierflow.offload.core.errors import TierConfigError
from tierflow.offload.tiers.config import TiersConfig

__all__ = ["HostDemand", "check_host_memory", "host_demand", "ranks_on_this_node"]

GiB = 1 << 30


@dataclass(frozen=True)
class HostDemand:
    """What the ranks of one node will hold in host RAM, against what the node has.

    Attributes:
        ranks_on_node: training processes sharing this node's memory.
        pool_bytes_per_rank: the most each rank's memory tiers can hold (host pool budget plus one slab;
            a NUMA pool that may fall back to node 0 counts too).
        process_bytes_per_rank: the rest of a rank: interpreter, framework, model and optimizer state
            kept in host memory (an estimate from the caller).
        total_bytes: the node's physical memory.
        reserve_bytes: kept free for the OS, page cache and other processes.
    """

    ranks_on_node: int
    pool_bytes_per_rank: int
    process_bytes_per_rank: int
    total_bytes: int
    reserve_bytes: int

    @property
    def need_bytes(self) -> int:
        return self.ranks_on_node * (self.pool_bytes_per_rank + self.process_bytes_per_rank)

    @property
    def available_bytes(self) -> int:
        return max(0, self.total_bytes - self.reserve_bytes)

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.available_bytes

    def largest_pool_per_rank(self) -> int:
        """The host pool per rank that would fit, with everything else unchanged (0 if none would)."""
        return max(0, self.available_bytes // max(1, self.ranks_on_node) - self.process_bytes_per_rank)

    def explain(self) -> str:
        return (f"{self.ranks_on_node} rank(s) on this node x ({_g(self.pool_bytes_per_rank)} of host tiers + "
                f"~{_g(self.process_bytes_per_rank)} of process memory) = {_g(self.need_bytes)}, but the node has "
                f"{_g(self.total_bytes)} with {_g(self.reserve_bytes)} kept for the OS = {_g(self.available_bytes)} "
                "usable")


def host_demand(tiers: TiersConfig, *, ranks_on_node: int, process_bytes_per_rank: int,
                total_bytes: Optional[int] = None, reserve_bytes: Optional[int] = None) -> HostDemand:
    """Size what ``ranks_on_node`` processes configured with ``tiers`` will hold in this node's RAM.

    Args:
        tiers: every rank's tier settings (each rank opens its own pools).
        ranks_on_node: processes on this node (torchrun's ``LOCAL_WORLD_SIZE``).
        process_bytes_per_rank: host bytes of one rank outside the tiers, in bytes.
        total_bytes: physical memory; default ``psutil.virtual_memory().total``.
        reserve_bytes: memory left to everything else; default the larger of 1 GiB and 5%.
    """
    if ranks_on_node < 1:
        raise ValueError(f"ranks_on_node={ranks_on_node} must be >= 1")
    if total_bytes is None:
        total_bytes = int(psutil.virtual_memory().total)
    if reserve_bytes is None:
        reserve_bytes = max(GiB, total_bytes // 20)
    pool = 0
    if tiers.host.enabled:
        pool += tiers.host.budget_bytes + tiers.host.slab_bytes
    if tiers.numa.enabled and (not tiers.numa.nodes or 0 in tiers.numa.nodes):
        # With no memory-only node the NUMA tier binds to node 0: ordinary DRAM, counted here.
        pool += tiers.numa.budget_bytes + tiers.numa.slab_bytes
    return HostDemand(ranks_on_node=ranks_on_node, pool_bytes_per_rank=pool,
                      process_bytes_per_rank=process_bytes_per_rank, total_bytes=total_bytes,
                      reserve_bytes=reserve_bytes)


def check_host_memory(demand: HostDemand) -> None:
    """Refuse a configuration whose ranks cannot fit in host RAM, saying what would fit.

    Raises:
        TierConfigError: the ranks need more than the node has.
    """
    if demand.fits:
        return
    fix: List[str] = []
    largest = demand.largest_pool_per_rank()
    if demand.pool_bytes_per_rank and largest > 0:
        fix.append(f"lower tiers.host.budget_bytes so each rank's pool is at most {_g(largest)}")
    if demand.pool_bytes_per_rank:
        fix.append("move the overflow to tiers.nvme")
    fix.append("or run fewer ranks per node")
    raise TierConfigError(f"host memory is oversubscribed: {demand.explain()}; " + ", ".join(fix))


def ranks_on_this_node() -> int:
    """Ranks sharing this node, from torchrun's (or the Ray launcher's) ``LOCAL_WORLD_SIZE``."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _g(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"
