"""Pure decisions of the tiered optimizer on hand-built inputs: sub-groups, order, paths, update placement, NUMA."""

import pytest

from tests.helpers import fake_numa_sysfs
from tierflow.offload import discover_numa_nodes
from tierflow.offload.optim.placement import (
    PathSpec,
    UpdateCosts,
    choose_path,
    numa_roles,
    partition_subgroups,
    place_updates,
    step_order,
)

GB = 1e9


def test_partition_never_splits_a_parameter_and_covers_each_once():
    groups = partition_subgroups([(0, 30), (0, 30), (0, 30), (1, 200), (1, 10), (1, 10)], 64)
    assert [g.param_ids for g in groups] == [(0, 1), (2,), (3,), (4, 5)]
    assert [g.group_ids for g in groups] == [(0, 0), (0,), (1,), (1, 1)]
    assert [g.param_bytes for g in groups] == [60, 30, 200, 20]
    with pytest.raises(ValueError, match="subgroup_bytes=0 must be > 0"):
        partition_subgroups([(0, 1)], 0)


def test_alternating_order_reads_the_last_written_first():
    assert step_order(5, 0) == (0, 1, 2, 3, 4)
    assert step_order(5, 1)[0] == step_order(5, 0)[-1]  # still in the staging buffers
    assert step_order(5, 2) == step_order(5, 0) and step_order(5, 3, alternate=False) == (0, 1, 2, 3, 4)


def test_paths_are_striped_by_bandwidth_and_capacity():
    nvme, numa = PathSpec("nvme", 3 * GB, 1000), PathSpec("numa", 1 * GB, 250)
    used = {"nvme": 0, "numa": 0}
    for _ in range(8):
        used[choose_path([nvme, numa], used, 100)] += 100
    assert used == {"nvme": 600, "numa": 200}  # 3:1 like the bandwidths
    assert choose_path([nvme, numa], {"nvme": 1000, "numa": 200}, 100) is None  # both full
    assert choose_path([nvme, numa], {"nvme": 1000, "numa": 0}, 100) == "numa"


def test_cpu_parameters_are_always_updated_on_the_cpu():
    p = place_updates([800, 800], [400, 400], UpdateCosts(cpu_update_bytes_per_s=1 * GB, device_free_bytes=10 ** 12))
    assert p.where == ("cpu", "cpu") and "parameters live on the CPU" in p.reason
    assert p.cpu_s == pytest.approx(2400 / GB)


def test_device_updates_take_sub_groups_while_they_shorten_the_step():
    # A sub-group on the CPU costs 0.15 s of CPU and 0.04 s of PCIe each way; on the device 0.08 s each way.
    costs = UpdateCosts(cpu_update_bytes_per_s=20 * GB, device_update_bytes_per_s=200 * GB,
                        host_to_device_bytes_per_s=25 * GB, device_to_host_bytes_per_s=25 * GB,
                        device_free_bytes=10 * 2 ** 30, params_on_device=True)
    state, params = [int(2e9)] * 8, [int(1e9)] * 8
    p = place_updates(state, params, costs)
    assert 0 < p.where.count("device") < 8  # neither extreme: CPU and PCIe are balanced
    all_cpu = place_updates(state, params, costs, force="cpu")
    all_device = place_updates(state, params, costs, force="device")
    assert p.predicted_s < min(all_cpu.predicted_s, all_device.predicted_s)


def test_no_device_update_without_room_in_the_trough_or_calibration():
    costs = UpdateCosts(cpu_update_bytes_per_s=2 * GB, device_update_bytes_per_s=200 * GB,
                        host_to_device_bytes_per_s=25 * GB, device_to_host_bytes_per_s=25 * GB,
                        device_free_bytes=3 * 10 ** 9, params_on_device=True)
    p = place_updates([int(2e9)] * 4, [int(1e9)] * 4, costs)
    assert set(p.where) == {"cpu"} and "below 2x the largest" in p.reason
    uncalibrated = UpdateCosts(cpu_update_bytes_per_s=2 * GB, params_on_device=True, device_free_bytes=10 ** 12)
    assert set(place_updates([10], [10], uncalibrated).where) == {"cpu"}
    with pytest.raises(ValueError, match="update_device=device needs"):
        place_updates([10], [10], uncalibrated, force="device")


def _fake_sysfs(root):
    """Two CPU sockets (0: CPUs 0-3, 1: CPUs 4-7) and two CXL expanders (2, 3)."""
    return fake_numa_sysfs(root, {0: "0-3", 1: "4-7", 2: "", 3: ""})


def test_numa_roles_keep_hot_state_local_and_cold_state_on_memory_only_nodes(tmp_path):
    nodes = discover_numa_nodes(str(_fake_sysfs(tmp_path / "node")))
    assert numa_roles(nodes, cpus=[4, 5]) == ((1,), (2, 3))
    assert numa_roles(nodes, cpus=range(8)) == ((0, 1), (2, 3))
