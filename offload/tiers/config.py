"""Typed configuration of the tier engine: one small config per component.

``TiersConfig`` is the ``tiers`` group of a run's config tree (``trainer/config.py`` imports it;
``conf/tiers/*.yaml`` only selects a preset and overrides values). Each tier and the scheduler get
their own part and nothing else. Every dataclass validates itself in ``__post_init__`` and reports
all of its problems at once in one :class:`~tierflow.offload.core.errors.TierConfigError` line naming each key.

Memory-vs-overlap knobs (what each costs):

* ``scheduler.max_inflight_per_link`` / ``scheduler.link_limits``: transfers running at once on a
  link. More overlaps more latency but contends for the same bandwidth and, on NVMe, stages more
  bytes.
* ``nvme.io_depth`` x ``nvme.chunk_bytes``: bytes staged per directory in bounce buffers (only for
  tensors that are not page-aligned, e.g. CUDA tensors without GPUDirect). Deeper queues reach
  the disk's bandwidth sooner; each step costs ``chunk_bytes`` of host memory per directory.
* ``host.slab_bytes``: pool memory may exceed ``budget_bytes`` by at most one slab; larger slabs
  mean fewer registrations with CUDA but a coarser bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from tierflow.offload.core.errors import TierConfigError
from tierflow.offload.core.hardware import HardwareModel
from tierflow.offload.core.validation import one_of, raise_if

__all__ = [
    "HostTierConfig",
    "NumaTierConfig",
    "NvmeTierConfig",
    "SchedulerConfig",
    "TiersConfig",
]

MiB = 1 << 20
GiB = 1 << 30




def _multiple_of_page(problems: List[str], key: str, value: int) -> None:
    if value <= 0 or value % 4096:
        problems.append(f"{key}={value} must be a positive multiple of 4096 (e.g. {key}={max(1, value // 4096 + 1) * 4096})")


@dataclass(kw_only=True)
class _PoolConfig:
    """Settings shared by the two memory tiers (pinned host pool and NUMA/CXL memory)."""

    KEY: ClassVar[str] = "tiers.host"

    enabled: bool = False
    budget_bytes: int = 1 * GiB
    slab_bytes: int = 64 * MiB
    pin: str = "auto"
    preallocate: bool = False

    def _problems(self) -> List[str]:
        p: List[str] = []
        if self.budget_bytes <= 0:
            p.append(f"{self.KEY}.budget_bytes={self.budget_bytes} must be > 0")
        _multiple_of_page(p, f"{self.KEY}.slab_bytes", self.slab_bytes)
        one_of(p, f"{self.KEY}.pin", self.pin, ["auto", "off"])
        return p

    def __post_init__(self) -> None:
        raise_if(self._problems(), TierConfigError)


@dataclass(kw_only=True)
class HostTierConfig(_PoolConfig):
    """The host tier: a pool of ``slab_bytes`` slabs, at most ``budget_bytes`` of reservations.

    Attributes:
        enabled: open this tier in a :class:`~tierflow.offload.tiers.engine.TierEngine`.
        budget_bytes: most bytes of slots at once; a reservation beyond raises ``TierFullError``.
            Pool memory never exceeds ``budget_bytes + slab_bytes``.
        slab_bytes: size of one slab, allocated once and sliced into slots (multiple of 4096).
        pin: ``auto`` registers slabs with ``cudaHostRegister`` when CUDA is available (DMA-able,
            async copies); ``off`` keeps them pageable.
        preallocate: allocate the whole budget at open (fail early) instead of slab by slab.
    """

    KEY: ClassVar[str] = "tiers.host"


@dataclass(kw_only=True)
class NumaTierConfig(_PoolConfig):
    """The numa tier: slabs bound to NUMA node(s) with ``mbind`` (how CXL memory appears).

    Attributes:
        nodes: node ids to bind to; several are interleaved page by page (several CXL cards cut
            contention). Empty: every memory-only (CXL) node, or node 0 with a warning if none.
        sysfs_root: where node topology is read (a fake tree in tests).
        (others as in :class:`HostTierConfig`, under ``tiers.numa``)
    """

    KEY: ClassVar[str] = "tiers.numa"

    nodes: List[int] = field(default_factory=list)
    sysfs_root: str = "/sys/devices/system/node"

    def __post_init__(self) -> None:
        p = self._problems()
        if any(n < 0 for n in self.nodes):
            p.append(f"{self.KEY}.nodes={list(self.nodes)} must hold node ids >= 0")
        if len(set(self.nodes)) != len(self.nodes):
            p.append(f"{self.KEY}.nodes={list(self.nodes)} lists a node twice")
        raise_if(p, TierConfigError)


@dataclass(kw_only=True)
class NvmeTierConfig:
    """The nvme tier: swap files under one or more directories, striped chunk by chunk.

    Attributes:
        enabled: open this tier in a :class:`~tierflow.offload.tiers.engine.TierEngine`.
        dirs: existing, writable directories (one per SSD for striping); a private ``0700``
            subdirectory with ``0600`` swap files is created in each.
        budget_bytes: most bytes of slots at once; ``None`` means the free space of the
            directories when the tier opens.
        chunk_bytes: unit of one I/O and of striping (multiple of 4096).
        io_depth: chunks in flight per directory (threads per directory); see the module notes.
        direct: ``auto`` uses O_DIRECT where the filesystem supports it and warns otherwise;
            ``on`` requires it; ``off`` uses buffered I/O (page cache: costs host memory).
        checksum: ``xxh3`` (the default), ``crc32`` or ``none``: per-chunk digests recorded on
            write and verified on read; a chunk that fails twice raises ``ChecksumError`` naming the
            file and offset. XXH3 hashes at ~10 GB/s per core, several times an SSD's bandwidth
            (docs/benchmarks.md measures the cost).
        backend: ``auto`` (POSIX for host tensors, kvikio for CUDA tensors when its start-up probe
            succeeds), ``posix``, ``kvikio`` (required; error if the probe fails) or
            ``deepspeed_aio`` (DeepSpeed's async_io op for host tensors, where it builds).
        preallocate: reserve disk blocks at ``reserve`` time (fallocate) so a full disk is found
            before any write instead of in the middle of one.
        keep_files: leave the swap files on disk at close (for inspection).
    """

    KEY: ClassVar[str] = "tiers.nvme"

    enabled: bool = False
    dirs: List[str] = field(default_factory=list)
    budget_bytes: Optional[int] = None
    chunk_bytes: int = 4 * MiB
    io_depth: int = 4
    direct: str = "auto"
    checksum: str = "xxh3"
    backend: str = "auto"
    preallocate: bool = True
    keep_files: bool = False

    def __post_init__(self) -> None:
        p: List[str] = []
        k = self.KEY
        if self.enabled and not self.dirs:
            p.append(f"{k}.dirs is empty; give at least one directory, e.g. {k}.dirs=[/mnt/nvme0/tierflow]")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            p.append(f"{k}.budget_bytes={self.budget_bytes} must be > 0 (or null for the free disk space)")
        _multiple_of_page(p, f"{k}.chunk_bytes", self.chunk_bytes)
        if self.io_depth < 1:
            p.append(f"{k}.io_depth={self.io_depth} must be >= 1")
        one_of(p, f"{k}.direct", self.direct, ["auto", "on", "off"])
        one_of(p, f"{k}.checksum", self.checksum, ["none", "xxh3", "crc32"])
        one_of(p, f"{k}.backend", self.backend, ["auto", "posix", "kvikio", "deepspeed_aio"])
        if len({os.path.realpath(d) for d in self.dirs}) != len(self.dirs):
            p.append(f"{k}.dirs={list(self.dirs)} names a directory twice; striping needs distinct directories")
        raise_if(p, TierConfigError)


@dataclass(kw_only=True)
class SchedulerConfig:
    """The transfer scheduler: one queue per link, a concurrency limit per link.

    Attributes:
        max_inflight_per_link: transfers (or NVMe chunks) running at once on a link unless the
            tier or ``link_limits`` says otherwise. More overlaps latency; too many contend.
        link_limits: per-link overrides by name, e.g. ``{"nvme:0": 8, "host": 2}``.
    """

    KEY: ClassVar[str] = "tiers.scheduler"

    max_inflight_per_link: int = 2
    link_limits: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p: List[str] = []
        if self.max_inflight_per_link < 1:
            p.append(f"{self.KEY}.max_inflight_per_link={self.max_inflight_per_link} must be >= 1")
        for name, limit in self.link_limits.items():
            if int(limit) < 1:
                p.append(f"{self.KEY}.link_limits.{name}={limit} must be >= 1")
        raise_if(p, TierConfigError)


@dataclass(kw_only=True)
class TiersConfig:
    """The ``tiers`` group: which tiers exist, their settings, and the hardware they run on.

    Attributes:
        preset: name of the hardware preset (``conf/tiers/<preset>.yaml``); ``none`` opens no tier.
        hardware: the preset's :class:`~tierflow.offload.core.hardware.HardwareModel` in its JSON form (links'
            bandwidth and latency, tier capacities, sources). Empty for ``none``.
        hardware_file: a HardwareModel JSON written by ``tierflow calibrate``; wins over
            ``hardware`` when set.
        host, numa, nvme, scheduler: the components' own configs.
    """

    preset: str = "none"
    hardware: Dict[str, Any] = field(default_factory=dict)
    hardware_file: Optional[str] = None
    host: HostTierConfig = field(default_factory=HostTierConfig)
    numa: NumaTierConfig = field(default_factory=NumaTierConfig)
    nvme: NvmeTierConfig = field(default_factory=NvmeTierConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        p: List[str] = []
        if self.hardware:
            p.extend(f"tiers.hardware: {msg}" for msg in HardwareModel.problems_in_dict(self.hardware))
        if self.hardware_file is not None and not os.path.isfile(self.hardware_file):
            p.append(f"tiers.hardware_file={self.hardware_file} does not exist; write one with "
                     f"`tierflow calibrate --out {self.hardware_file}`")
        elif self.hardware_file is not None:
            try:  # read it now: a malformed file is refused before any work, not at planning
                HardwareModel.load(self.hardware_file)
            except TierConfigError as exc:
                p.append(f"tiers.hardware_file: {exc}")
        raise_if(p, TierConfigError)

    def hardware_model(self) -> Optional[HardwareModel]:
        """The HardwareModel to plan with: ``hardware_file`` if set, else the preset's, else None."""
        if self.hardware_file is not None:
            return HardwareModel.load(self.hardware_file)
        return HardwareModel.from_dict(self.hardware) if self.hardware else None
