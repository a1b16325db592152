"""Decisions of the tiered optimizer, as pure functions on plain data (no tensors, no files).

* :func:`partition_subgroups`: consecutive parameters packed into sub-groups of about
  ``subgroup_bytes`` parameter bytes (a parameter is never split: a generic optimizer may need
  the whole tensor, e.g. for a per-tensor norm).
* :func:`step_order`: the order sub-groups are updated in one step. Alternating the direction
  every step (MLP-Offload's cache-friendly order) means the sub-groups written last in step k
  are the first ones step k+1 needs, so they are still in the staging buffers and are not read
  back at all; the ones read back from a tier are the oldest writes, long since drained.
* :func:`choose_path`: which tier (path) a sub-group's state goes to: the one that finishes
  soonest given the bytes already there and its bandwidth (MLP-Offload's multi-path striping).
* :func:`place_updates`: per sub-group, update on the CPU or on the device (Deep Optimizer
  States), from calibrated link bandwidths and measured update rates.
* :func:`numa_roles`: which NUMA nodes are local to the updating CPUs (staging buffers and hot
  state) and which are memory-only (cold state), after the CXL fine-tuning study.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

from tierflow.offload.core.hardware import HardwareModel

__all__ = [
    "PathSpec",
    "SubGroup",
    "UpdateCosts",
    "UpdatePlacement",
    "choose_path",
    "link_bandwidth",
    "numa_roles",
    "partition_subgroups",
    "path_bandwidth",
    "place_updates",
    "step_order",
]


@dataclass(frozen=True)
class SubGroup:
    """Consecutive parameters whose optimizer state moves and updates as one unit.

    Attributes:
        index: position among the optimizer's sub-groups.
        param_ids: flat indices of the parameters (param_groups order, then order in the group).
        group_ids: the param_group of each parameter, aligned with ``param_ids``.
        param_bytes: bytes of the parameters.
    """

    index: int
    param_ids: Tuple[int, ...]
    group_ids: Tuple[int, ...]
    param_bytes: int


def partition_subgroups(params: Sequence[Tuple[int, int]], subgroup_bytes: int) -> Tuple[SubGroup, ...]:
    """Pack parameters, in order, into sub-groups of at most ``subgroup_bytes`` parameter bytes.

    Args:
        params: ``(group_id, nbytes)`` per parameter, in flat order.
        subgroup_bytes: target parameter bytes per sub-group (> 0); a larger parameter gets a
            sub-group of its own.

    Returns:
        The sub-groups, covering every parameter exactly once, in order.

    Example:
        >>> [g.param_ids for g in partition_subgroups([(0, 40), (0, 40), (1, 100), (1, 8)], 80)]
        [(0, 1), (2,), (3,)]
    """
    if subgroup_bytes <= 0:
        raise ValueError(f"subgroup_bytes={subgroup_bytes} must be > 0")
    groups: List[SubGroup] = []
    ids: List[int] = []
    gids: List[int] = []
    total = 0
    for pid, (gid, nbytes) in enumerate(params):
        if ids and total + nbytes > subgroup_bytes:
            groups.append(SubGroup(len(groups), tuple(ids), tuple(gids), total))
            ids, gids, total = [], [], 0
        ids.append(pid)
        gids.append(gid)
        total += nbytes
    if ids:
        groups.append(SubGroup(len(groups), tuple(ids), tuple(gids), total))
    return tuple(groups)


def step_order(num_subgroups: int, step: int, *, alternate: bool = True) -> Tuple[int, ...]:
    """Sub-group indices in update order for optimizer step ``step`` (0-based).

    Even steps go forward, odd steps backward when ``alternate`` (see the module docstring).

    Example:
        >>> step_order(4, 0), step_order(4, 1), step_order(4, 1, alternate=False)
        ((0, 1, 2, 3), (3, 2, 1, 0), (0, 1, 2, 3))
    """
    forward = tuple(range(num_subgroups))
    return forward[::-1] if alternate and step % 2 else forward


@dataclass(frozen=True)
class PathSpec:
    """One path sub-group state can be striped over (a tier).

    Attributes:
        name: the tier's kind (``host``, ``numa``, ``nvme``).
        bandwidth_bytes_per_s: its sustained bandwidth (calibrated, or equal weights when unknown).
        capacity_bytes: bytes it may hold for the optimizer.
    """

    name: str
    bandwidth_bytes_per_s: float
    capacity_bytes: int


def choose_path(paths: Sequence[PathSpec], used_bytes: Mapping[str, int], nbytes: int) -> Optional[str]:
    """The path that would finish moving its bytes soonest with ``nbytes`` more, among those with room.

    Striping by bandwidth keeps every path busy for about the same time per step, so a step's
    I/O takes ``total / sum(bandwidths)`` instead of ``total / bandwidth`` of one path. Ties go to
    the earlier path in ``paths``.

    Returns:
        The path's name, or None when no path has ``nbytes`` of room left.

    Example:
        >>> fast, slow = PathSpec("nvme", 2e9, 10**9), PathSpec("numa", 1e9, 10**9)
        >>> choose_path([fast, slow], {"nvme": 300, "numa": 100}, 100)
        'nvme'
        >>> choose_path([fast, slow], {"nvme": 400, "numa": 100}, 100)
        'numa'
    """
    best, best_s = None, float("inf")
    for path in paths:
        used = used_bytes.get(path.name, 0)
        if used + nbytes > path.capacity_bytes:
            continue
        finish_s = (used + nbytes) / path.bandwidth_bytes_per_s
        if finish_s < best_s:
            best, best_s = path.name, finish_s
    return best


@dataclass(frozen=True)
class UpdateCosts:
    """What the update-placement model needs to know about the machine.

    Attributes:
        cpu_update_bytes_per_s: state+parameter bytes the CPU update processes per second (measured).
        device_update_bytes_per_s: the same on the device (measured, or a datasheet estimate).
        host_to_device_bytes_per_s, device_to_host_bytes_per_s: the PCIe link, per direction
            (from the HardwareModel).
        device_free_bytes: device memory free during the update trough; a device update needs
            ``2 x`` the largest sub-group's state there (one updating, one arriving).
        params_on_device: False when the model lives on the CPU: then every update is on the CPU.
    """

    cpu_update_bytes_per_s: float
    device_update_bytes_per_s: float = 0.0
    host_to_device_bytes_per_s: float = 0.0
    device_to_host_bytes_per_s: float = 0.0
    device_free_bytes: int = 0
    params_on_device: bool = False


@dataclass(frozen=True)
class UpdatePlacement:
    """Where each sub-group is updated, the predicted busy time of each resource, and why.

    Attributes:
        where: ``"cpu"`` or ``"device"`` per sub-group.
        cpu_s: predicted CPU update seconds per step.
        h2d_s, d2h_s: predicted PCIe seconds per direction per step.
        device_s: predicted device update seconds per step.
        reason: one line explaining the decision.
    """

    where: Tuple[str, ...]
    cpu_s: float
    h2d_s: float
    d2h_s: float
    device_s: float
    reason: str

    @property
    def predicted_s(self) -> float:
        """The step's update time: the busiest resource (the others overlap with it)."""
        return max(self.cpu_s, self.h2d_s, self.d2h_s, self.device_s)


def place_updates(state_bytes: Sequence[int], param_bytes: Sequence[int], costs: UpdateCosts,
                  *, force: Optional[str] = None) -> UpdatePlacement:
    """Choose CPU or device update per sub-group so the busiest resource finishes first.

    A CPU update of a device-resident sub-group moves its gradient to the host and the new
    parameters back (``param_bytes`` each way) and costs ``(state + param) / cpu rate`` on the CPU;
    a device update moves its state to the device and back (``state_bytes`` each way) and costs
    ``(state + param) / device rate`` there. CPU, device and the two PCIe directions work in
    parallel, so a step takes as long as the busiest of them. Greedy, largest sub-group first:
    each goes where the resulting busiest resource is least busy (a standard list-scheduling
    heuristic; Deep Optimizer States uses the same per-sub-group comparison).

    Args:
        state_bytes, param_bytes: per sub-group.
        costs: calibrated bandwidths and measured update rates.
        force: ``"cpu"`` or ``"device"`` to override the model (still reported with its times).

    Returns:
        The placement with predicted times and a reason.
    """
    n = len(state_bytes)
    if len(param_bytes) != n:
        raise ValueError(f"state_bytes has {n} entries but param_bytes has {len(param_bytes)}")
    if costs.cpu_update_bytes_per_s <= 0:
        raise ValueError("costs.cpu_update_bytes_per_s must be > 0 (measure it with a CPU update first)")
    device_ok = (costs.params_on_device and costs.device_update_bytes_per_s > 0
                 and costs.host_to_device_bytes_per_s > 0 and costs.device_to_host_bytes_per_s > 0)
    largest = max(state_bytes, default=0)
    fits = costs.device_free_bytes >= 2 * largest
    totals = {"cpu": 0.0, "h2d": 0.0, "d2h": 0.0, "device": 0.0}

    def cost(i: int, where: str) -> Mapping[str, float]:
        touched = state_bytes[i] + param_bytes[i]
        if where == "cpu":
            if not device_ok:  # CPU parameters, or PCIe not calibrated: only the CPU time is known
                return {"cpu": touched / costs.cpu_update_bytes_per_s}
            return {"cpu": touched / costs.cpu_update_bytes_per_s,
                    "d2h": param_bytes[i] / costs.device_to_host_bytes_per_s,
                    "h2d": param_bytes[i] / costs.host_to_device_bytes_per_s}
        return {"device": touched / costs.device_update_bytes_per_s,
                "h2d": state_bytes[i] / costs.host_to_device_bytes_per_s,
                "d2h": state_bytes[i] / costs.device_to_host_bytes_per_s}

    if force is not None and force not in ("cpu", "device"):
        raise ValueError(f"force={force!r} must be 'cpu', 'device' or None")
    if force == "device" and not device_ok:
        raise ValueError("update_device=device needs parameters on a CUDA device and calibrated device rates")
    where: List[str] = ["cpu"] * n
    for i in sorted(range(n), key=lambda i: -(state_bytes[i] + param_bytes[i])):
        options = [force] if force else (["cpu", "device"] if device_ok and fits else ["cpu"])
        best, best_peak = options[0], float("inf")
        for option in options:
            trial = dict(totals)
            for k, v in cost(i, option).items():
                trial[k] += v
            peak = max(trial.values())
            if peak < best_peak:
                best, best_peak = option, peak
        where[i] = best
        for k, v in cost(i, best).items():
            totals[k] += v
    if force:
        reason = f"update_device={force} (forced)"
    elif not costs.params_on_device:
        reason = "parameters live on the CPU: every sub-group is updated there"
    elif not device_ok:
        reason = "no calibrated device update rate or PCIe bandwidth: every sub-group is updated on the CPU"
    elif not fits:
        reason = (f"device trough has {costs.device_free_bytes} B free, below 2x the largest sub-group state "
                  f"({2 * largest} B): every sub-group is updated on the CPU")
    else:
        on_device = where.count("device")
        reason = (f"{on_device} of {n} sub-groups on the device, the rest on the CPU: balances CPU "
                  f"{totals['cpu']:.3g} s, device {totals['device']:.3g} s, PCIe h2d {totals['h2d']:.3g} s / "
                  f"d2h {totals['d2h']:.3g} s")
    return UpdatePlacement(tuple(where), totals["cpu"], totals["h2d"], totals["d2h"], totals["device"], reason)


def numa_roles(nodes: Iterable, cpus: Iterable[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Split NUMA nodes into those local to ``cpus`` and memory-only (CXL) ones.

    The CPU update touches its staging buffers and hot state every step: they belong on the
    nodes of the CPUs running it (local DRAM). State that waits between steps goes to memory-only
    nodes (CXL expanders), where its bandwidth is enough for streaming.

    Args:
        nodes: :class:`~tierflow.offload.tiers.numa.NumaNode` records (from ``discover_numa_nodes``).
        cpus: CPU ids the update runs on (``os.sched_getaffinity(0)``).

    Returns:
        ``(local_node_ids, memory_only_node_ids)``.
    """
    cpu_set = set(cpus)
    nodes = list(nodes)
    local = tuple(n.node_id for n in nodes if cpu_set & set(n.cpus))
    far = tuple(n.node_id for n in nodes if n.memory_only)
    return local, far


def link_bandwidth(hw: HardwareModel, src: str, dst: str) -> float:
    try:
        return hw.link(src, dst).bandwidth_bytes_per_s
    except KeyError:
        return 0.0


def path_bandwidth(hw: Optional[HardwareModel], kind: str) -> float:
    """Host-to-tier bandwidth of every tier of ``kind`` together (1.0 each when not calibrated)."""
    if hw is None:
        return 1.0
    total = sum(l.bandwidth_bytes_per_s for l in hw.links
                if l.src == "host" and (l.dst == kind or l.dst.startswith(kind + ":")))
    if not total:
        warnings.warn(f"the hardware model has no host->{kind} link; striping treats {kind} as bandwidth 1",
                      stacklevel=3)
    return total or 1.0
