"""The numa tier: memory bound to NUMA node(s), which is how CXL memory expanders appear.

A CXL Type-3 expander shows up as a NUMA node with memory and no CPUs. Discovery reads
``/sys/devices/system/node`` (size, free memory, CPUs and distances of each node); slabs are mapped,
bound with ``mbind`` before their first touch (so every page lands on the chosen nodes), and
registered for DMA on CUDA. Several nodes are interleaved page by page: with two or more expanders
each transfer draws on all of them, which is what cuts contention (the CXL fine-tuning study).

Example:
    >>> nodes = discover_numa_nodes()           # doctest: +SKIP
    >>> [n.node_id for n in nodes if n.memory_only]  # CXL expanders   # doctest: +SKIP
    [2, 3]
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from tierflow.offload.core.errors import TierConfigError, TierError
from tierflow.offload.core.units import format_bytes
from tierflow.offload.tiers import _cuda
from tierflow.offload.tiers._memory import MappedMemory
from tierflow.offload.tiers._pool import PooledTier, SlabPool
from tierflow.offload.tiers.config import NumaTierConfig
from tierflow.offload.tiers.scheduler import TransferScheduler

__all__ = ["NumaNode", "NumaTier", "discover_numa_nodes", "mbind", "numa_placement"]

_MPOL_BIND = 2
_MPOL_INTERLEAVE = 3
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "ppc64le": 259, "s390x": 235, "riscv64": 235}


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node as the kernel reports it.

    Attributes:
        node_id: the kernel's node number.
        total_bytes: memory on the node.
        free_bytes: free memory when discovered.
        cpus: CPU ids on the node (empty for a memory-only node).
        distances: SLIT distances to every node, in node order (10 = local).
    """

    node_id: int
    total_bytes: int
    free_bytes: int
    cpus: Tuple[int, ...]
    distances: Tuple[int, ...] = ()

    @property
    def memory_only(self) -> bool:
        """True for a node with memory and no CPUs: a CXL memory expander."""
        return not self.cpus and self.total_bytes > 0

    def describe(self) -> str:
        what = "memory-only (CXL-style)" if self.memory_only else f"CPUs {_format_cpus(self.cpus)}"
        return f"node {self.node_id}: {format_bytes(self.total_bytes)} ({format_bytes(self.free_bytes)} free), {what}"


def discover_numa_nodes(sysfs_root: str = "/sys/devices/system/node") -> Tuple[NumaNode, ...]:
    """Read every ``node<N>`` under ``sysfs_root``.

    Args:
        sysfs_root: the node directory of sysfs (a fake tree in tests).

    Returns:
        Nodes sorted by id.

    Raises:
        TierConfigError: when the tree is missing or has no node.
    """
    if not os.path.isdir(sysfs_root):
        raise TierConfigError(f"no NUMA topology at {sysfs_root}; is /sys mounted? (tiers.numa.sysfs_root={sysfs_root})")
    nodes = []
    for entry in sorted(os.listdir(sysfs_root)):
        match = re.fullmatch(r"node(\d+)", entry)
        if not match:
            continue
        path = os.path.join(sysfs_root, entry)
        meminfo = _read_meminfo(os.path.join(path, "meminfo"))
        nodes.append(NumaNode(
            node_id=int(match.group(1)),
            total_bytes=meminfo.get("MemTotal", 0),
            free_bytes=meminfo.get("MemFree", 0),
            cpus=_parse_cpulist(_read(os.path.join(path, "cpulist"))),
            distances=tuple(int(x) for x in _read(os.path.join(path, "distance")).split()),
        ))
    if not nodes:
        raise TierConfigError(f"{sysfs_root} lists no node<N> directory; set tiers.numa.sysfs_root to the node directory of sysfs")
    return tuple(sorted(nodes, key=lambda n: n.node_id))


def mbind(address: int, nbytes: int, nodes: Sequence[int]) -> None:
    """Bind (one node) or interleave (several) ``[address, address + nbytes)`` before first touch.

    Raises:
        TierError: when the kernel refuses (unknown node, cpuset, seccomp), with the reason.
    """
    number = _SYS_MBIND.get(platform.machine())
    if number is None:
        raise TierError(f"mbind: unsupported architecture {platform.machine()}; disable the numa tier (tiers.numa.enabled=false)")
    words = max(nodes) // 64 + 1
    mask = (ctypes.c_ulong * words)()
    for node in nodes:
        mask[node // 64] |= 1 << (node % 64)
    mode = _MPOL_BIND if len(nodes) == 1 else _MPOL_INTERLEAVE
    libc = ctypes.CDLL(None, use_errno=True)
    # maxnode is one more than the bits in the mask: the kernel has always dropped the last bit.
    result = libc.syscall(ctypes.c_long(number), ctypes.c_void_p(address), ctypes.c_ulong(nbytes), ctypes.c_int(mode),
                          mask, ctypes.c_ulong(words * 64 + 1), ctypes.c_uint(0))
    if result != 0:
        err = ctypes.get_errno()
        raise TierError(f"mbind of {format_bytes(nbytes)} to NUMA node(s) {list(nodes)} failed: {os.strerror(err)}; "
                        f"check tiers.numa.nodes against `numactl -H` (a container may also forbid mbind)")


def numa_placement(address: int) -> Dict[str, object]:
    """Policy and pages per node of the mapping starting at ``address``, from /proc/self/numa_maps.

    Returns:
        ``{"policy": "bind:0", "pages": {0: 512}}``; empty when no mapping starts there.
    """
    prefix = f"{address:x} "
    with open("/proc/self/numa_maps") as f:
        for line in f:
            if line.startswith(prefix):
                fields = line.split()
                pages = {int(m.group(1)): int(m.group(2)) for m in (re.fullmatch(r"N(\d+)=(\d+)", x) for x in fields) if m}
                return {"policy": fields[1], "pages": pages}
    return {}


class NumaTier(PooledTier):
    """Host memory bound to chosen NUMA nodes, with a byte budget.

    Args:
        config: nodes, budget, slab size, pinning.
        scheduler: shared scheduler; the tier makes its own when None.

    Raises:
        TierConfigError: when a chosen node does not exist, has no memory, or the budget exceeds the
            free memory of the chosen nodes (before anything is allocated).
    """

    kind = "numa"

    def __init__(self, config: NumaTierConfig, scheduler: Optional[TransferScheduler] = None) -> None:
        self.config = config
        self.topology = discover_numa_nodes(config.sysfs_root)
        self.nodes = self._choose_nodes(config, self.topology)
        self.pinned = config.pin == "auto" and _cuda.available()
        nodes = tuple(n.node_id for n in self.nodes)
        pool = SlabPool(tier=f"numa:{','.join(map(str, nodes))}", budget_bytes=config.budget_bytes,
                        slab_bytes=config.slab_bytes, budget_setting=f"{config.KEY}.budget_bytes",
                        make_slab=lambda n: MappedMemory(n, bind=lambda a, k: mbind(a, k, nodes), pin=self.pinned),
                        preallocate=config.preallocate)
        super().__init__(pool.tier, pool, scheduler)

    @staticmethod
    def _choose_nodes(config: NumaTierConfig, topology: Tuple[NumaNode, ...]) -> List[NumaNode]:
        by_id = {n.node_id: n for n in topology}
        key = config.KEY
        if config.nodes:
            problems = [f"{key}.nodes lists node {i}, which does not exist (nodes: {sorted(by_id)})"
                        for i in config.nodes if i not in by_id]
            problems += [f"{key}.nodes lists node {i}, which has no memory" for i in config.nodes
                         if i in by_id and by_id[i].total_bytes == 0]
            if problems:
                raise TierConfigError("; ".join(problems))
            chosen = [by_id[i] for i in config.nodes]
        else:
            chosen = [n for n in topology if n.memory_only]
            if not chosen:
                chosen = [next(n for n in topology if n.total_bytes > 0)]
                warnings.warn(f"no memory-only (CXL) NUMA node found; the numa tier binds to node {chosen[0].node_id} "
                              f"(set {key}.nodes to choose)", stacklevel=3)
        free = sum(n.free_bytes for n in chosen)
        if config.budget_bytes > free:
            raise TierConfigError(
                f"{key}.budget_bytes={config.budget_bytes} ({format_bytes(config.budget_bytes)}) exceeds the free memory "
                f"of node(s) {[n.node_id for n in chosen]} ({format_bytes(free)}); lower it or add nodes to {key}.nodes")
        return chosen


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _read_meminfo(path: str) -> Dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        match = re.match(r"Node\s+\d+\s+(\w+):\s+(\d+)(?:\s+kB)?", line)
        if match:
            out[match.group(1)] = int(match.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def _parse_cpulist(text: str) -> Tuple[int, ...]:
    cpus: List[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _format_cpus(cpus: Tuple[int, ...]) -> str:
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 and cpus[-1] - cpus[0] == len(cpus) - 1 else ",".join(map(str, cpus))
