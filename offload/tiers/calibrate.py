"""Link calibration: time real transfers through the tiers and fit a :class:`HardwareModel`.

Each link is measured through the same tier code the runtime uses (so the model includes our own
overheads, not just the hardware's): for every transfer size and concurrency level, ``concurrency``
transfers are submitted at once and timed until all finish, ``repeats`` times. Links measured:

* ``device->host`` / ``host->device`` through the host pool (pinned on CUDA). Without a GPU the
  device is process memory (DESIGN.md, Tiers) and these are the real copies into the pool, so a
  model calibrated on a CPU machine plans offloading for that machine;
* ``host->numa:<n>`` / ``numa:<n>->host`` for each NUMA node with memory;
* ``host->nvme:<i>`` / ``nvme:<i>->host`` for each directory, from page-aligned host memory;
* ``device->nvme:<i>`` / ``nvme:<i>->device``: kvikio on CUDA, else staged through aligned buffers.

Example:
    >>> plan = CalibrationPlan(sizes_bytes=(1 << 20,), concurrency=(1, 2), repeats=2)
    >>> model = calibrate(plan, nvme_dirs=["/tmp"], numa_nodes=[])   # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import psutil
import torch

from tierflow.offload.core.errors import TierConfigError
from tierflow.offload.core.hardware import HardwareModel, LinkModel, LinkSample, TierModel, fit_link
from tierflow.offload.tiers import _cuda
from tierflow.offload.tiers._memory import aligned_empty
from tierflow.offload.tiers.base import Tier
from tierflow.offload.tiers.config import HostTierConfig, NumaTierConfig, NvmeTierConfig, SchedulerConfig
from tierflow.offload.tiers.host import HostTier
from tierflow.offload.tiers.numa import NumaTier, discover_numa_nodes
from tierflow.offload.tiers.nvme import NvmeTier
from tierflow.offload.tiers.scheduler import TransferScheduler

__all__ = ["CalibrationPlan", "calibrate", "measure_link"]


@dataclass(frozen=True)
class CalibrationPlan:
    """What to measure.

    Attributes:
        sizes_bytes: transfer sizes.
        concurrency: transfers in flight at once.
        repeats: rounds per (size, concurrency); the mean is kept.
        chunk_bytes: NVMe chunk size (the I/O size).
    """

    sizes_bytes: Tuple[int, ...] = (1 << 20, 8 << 20, 64 << 20)
    concurrency: Tuple[int, ...] = (1, 2, 4)
    repeats: int = 3
    chunk_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        p = []
        if not self.sizes_bytes or any(s <= 0 or s % 4096 for s in self.sizes_bytes):
            p.append(f"sizes {list(self.sizes_bytes)} must be positive multiples of 4096")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            p.append(f"concurrency {list(self.concurrency)} must be >= 1")
        if self.repeats < 1:
            p.append(f"repeats={self.repeats} must be >= 1")
        if p:
            raise TierConfigError("; ".join(p))

    @property
    def peak_bytes(self) -> int:
        """Bytes of slots one measurement holds at most (per link)."""
        return max(self.sizes_bytes) * max(self.concurrency)


Progress = Callable[[str], None]


def measure_link(open_tier: Callable[[TransferScheduler, int], Tier], make_tensor: Callable[[int], torch.Tensor],
                 plan: CalibrationPlan) -> Tuple[List[LinkSample], List[LinkSample]]:
    """Time writes and reads through tiers made by ``open_tier(scheduler, concurrency)``.

    Returns:
        ``(write_samples, read_samples)``; contents are verified on every read of the first round.
    """
    writes, reads = [], []
    for c in plan.concurrency:
        with TransferScheduler(SchedulerConfig(max_inflight_per_link=c)) as scheduler, open_tier(scheduler, c) as tier:
            for size in plan.sizes_bytes:
                srcs = [make_tensor(size) for _ in range(c)]
                for i, s in enumerate(srcs):
                    s.view(torch.uint8)[:: 4096].fill_((i * 31 + size) % 251)  # touch every page, distinct content
                dsts = [make_tensor(size).fill_(0) for _ in range(c)]  # fault pages in before timing
                slots = [tier.reserve(size) for _ in range(c)]
                w = r = 0.0
                for rep in range(-1, plan.repeats):  # round -1 warms up threads, streams and pages
                    if rep == 0:
                        w = r = 0.0
                    start = time.perf_counter()
                    for h in [tier.write(slot, s) for slot, s in zip(slots, srcs)]:
                        h.wait()
                    w += time.perf_counter() - start
                    start = time.perf_counter()
                    for h in [tier.read(slot, d) for slot, d in zip(slots, dsts)]:
                        h.wait()
                    r += time.perf_counter() - start
                    if rep == -1 and not all(torch.equal(s, d) for s, d in zip(srcs, dsts)):
                        raise AssertionError(f"calibration read back different bytes on {tier.name}")
                for slot in slots:
                    tier.free(slot)
                writes.append(LinkSample(size, c, w / plan.repeats))
                reads.append(LinkSample(size, c, r / plan.repeats))
    return writes, reads


def _link(src: str, dst: str, samples: Sequence[LinkSample], how: str) -> LinkModel:
    bandwidth, latency, best = fit_link(samples)
    return LinkModel(src=src, dst=dst, bandwidth_bytes_per_s=bandwidth, latency_s=latency, best_concurrency=best,
                     samples=tuple(samples), source=f"measured by tierflow calibrate ({how})")


def _report(progress: Optional[Progress], links: Iterable[LinkModel]) -> None:
    for link in links:
        if progress is not None:
            progress(f"  {link.name:<18} {link.bandwidth_bytes_per_s / 1e9:8.2f} GB/s   latency {link.latency_s * 1e6:8.1f} us"
                     f"   best at {link.best_concurrency} in flight")


def calibrate(plan: CalibrationPlan, *, nvme_dirs: Sequence[str] = (), numa_nodes: Optional[Sequence[int]] = None,
              host_budget_bytes: Optional[int] = None, numa_sysfs_root: str = "/sys/devices/system/node",
              use_cuda: Optional[bool] = None, name: Optional[str] = None,
              progress: Optional[Progress] = None) -> HardwareModel:
    """Measure every available link and return the fitted HardwareModel.

    Args:
        plan: sizes, concurrency levels and repeats.
        nvme_dirs: swap directories to measure (each its own ``nvme:<i>`` tier).
        numa_nodes: nodes to measure; None measures every node with memory, ``[]`` none.
        host_budget_bytes: the host tier's capacity to record (default: available memory now).
        numa_sysfs_root: NUMA topology root.
        use_cuda: the device is a CUDA GPU; default when CUDA is available (else process memory).
        name: label of the model (default: the host name).
        progress: called with one line per measured link.

    Raises:
        TierConfigError: when a directory or node cannot be used (before anything is measured).
    """
    use_cuda = _cuda.available() if use_cuda is None else use_cuda
    need = plan.peak_bytes
    chunk = plan.chunk_bytes
    tiers: List[TierModel] = []
    links: List[LinkModel] = []

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    def open_nvme(s: TransferScheduler, c: int, directory: str) -> NvmeTier:
        return NvmeTier(NvmeTierConfig(enabled=True, dirs=[directory], chunk_bytes=chunk, io_depth=c), s)

    # Open every directory once before measuring anything: a bad one fails now, not halfway.
    nvme_capacity = []
    for directory in nvme_dirs:
        with TransferScheduler() as s, open_nvme(s, 1, directory) as probe:
            nvme_capacity.append(probe.capacity_bytes)
    host_cfg = HostTierConfig(enabled=True, budget_bytes=need, slab_bytes=max(plan.sizes_bytes))
    tiers.append(TierModel("host", "host", host_budget_bytes or psutil.virtual_memory().available, "host DRAM"))
    device = "cuda" if use_cuda else "cpu"

    def device_buffer(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, device=device)

    if use_cuda:
        tiers.append(TierModel("device", "device", torch.cuda.mem_get_info()[1], torch.cuda.get_device_name()))
    else:
        tiers.append(TierModel("device", "device", psutil.virtual_memory().total, "CPU memory (no GPU)"))
    via_pool = "pinned host pool" if use_cuda else "host pool copy (CPU device)"
    say(f"device <-> host ({via_pool})")
    w, r = measure_link(lambda s, c: HostTier(host_cfg, s), device_buffer, plan)
    links += [_link("device", "host", w, via_pool), _link("host", "device", r, via_pool)]
    _report(progress, links[-2:])

    nodes = discover_numa_nodes(numa_sysfs_root)
    chosen = [n for n in nodes if n.total_bytes > 0] if numa_nodes is None else [n for n in nodes if n.node_id in numa_nodes]
    missing = sorted(set(numa_nodes or ()) - {n.node_id for n in nodes})
    if missing:
        raise TierConfigError(f"NUMA node(s) {missing} do not exist here (nodes: {[n.node_id for n in nodes]})")
    for node in chosen:
        tier = f"numa:{node.node_id}"
        tiers.append(TierModel(tier, "numa", node.free_bytes, node.describe()))
        cfg = NumaTierConfig(enabled=True, nodes=[node.node_id], budget_bytes=need, slab_bytes=max(plan.sizes_bytes),
                             sysfs_root=numa_sysfs_root)
        say(f"host <-> {tier}")
        w, r = measure_link(lambda s, c: NumaTier(cfg, s), lambda n: aligned_empty(n), plan)
        links += [_link("host", tier, w, "mbind-bound slabs"), _link(tier, "host", r, "mbind-bound slabs")]
        _report(progress, links[-2:])

    for i, directory in enumerate(nvme_dirs):
        tier = f"nvme:{i}"
        tiers.append(TierModel(tier, "nvme", nvme_capacity[i], os.path.abspath(directory)))
        opener = lambda s, c, directory=directory: open_nvme(s, c, directory)  # noqa: E731
        say(f"host <-> {tier} ({directory})")
        w, r = measure_link(opener, lambda n: aligned_empty(n), plan)
        links += [_link("host", tier, w, f"O_DIRECT, {chunk >> 20} MiB chunks"), _link(tier, "host", r, f"O_DIRECT, {chunk >> 20} MiB chunks")]
        _report(progress, links[-2:])
        via_nvme = "kvikio or staged" if use_cuda else "staged through aligned buffers (CPU device)"
        say(f"device <-> {tier}")
        w, r = measure_link(opener, device_buffer, plan)
        links += [_link("device", tier, w, via_nvme), _link(tier, "device", r, via_nvme)]
        _report(progress, links[-2:])

    return HardwareModel(name=name or socket.gethostname(), tiers=tuple(tiers), links=tuple(links),
                         source=f"tierflow calibrate: sizes {list(plan.sizes_bytes)} B, concurrency "
                                f"{list(plan.concurrency)}, {plan.repeats} repeats",
                         created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
