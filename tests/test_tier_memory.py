"""The memory tiers: extent allocator, pinned host pool, NUMA discovery and binding."""

import random

import pytest
import torch

from tierflow.offload import (
    HostTier,
    HostTierConfig,
    NumaTier,
    NumaTierConfig,
    TierConfigError,
    TierError,
    TierFullError,
    aligned_empty,
    discover_numa_nodes,
    numa_placement,
)
from tierflow.offload.tiers._memory import ExtentAllocator

MiB = 1 << 20


# --- extent allocator ---------------------------------------------------------------------------


def test_allocator_rounds_to_pages_not_powers_of_two():
    a = ExtentAllocator(64 * MiB)
    first = a.alloc(33 * MiB + 1)  # a power-of-two allocator would take 64 MiB
    assert first == 0
    assert a.free_bytes == 64 * MiB - (33 * MiB + 4096)
    assert a.alloc(30 * MiB) is not None


def test_allocator_coalesces_neighbours_and_never_overlaps():
    rng = random.Random(0)
    a = ExtentAllocator(8 * MiB)
    live = {}
    for _ in range(2000):
        if live and rng.random() < 0.5:
            off = rng.choice(list(live))
            a.free(off, live.pop(off))
        else:
            n = rng.randint(1, 300_000)
            off = a.alloc(n)
            if off is not None:
                live[off] = n
        spans = sorted((o, o + ((n + 4095) // 4096) * 4096) for o, n in live.items())
        assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))
        assert a.free_bytes == 8 * MiB - sum(e - s for s, e in spans)
    for off, n in list(live.items()):
        a.free(off, n)
    assert a.largest_free == 8 * MiB  # everything merged back into one extent


def test_allocator_grows_like_a_swap_file():
    a = ExtentAllocator()
    assert a.alloc_growing(5000) == 0 and a.size == 8192
    a.free(0, 5000)
    assert a.alloc_growing(12288) == 0 and a.size == 12288  # reuses the free tail, grows only the rest


# --- host tier ----------------------------------------------------------------------------------


def _roundtrip(tier, t):
    slot = tier.reserve(t.nbytes)
    tier.write(slot, t).wait()
    out = torch.empty_like(t)
    tier.read(slot, out).wait()
    return slot, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8])
def test_host_tier_round_trips_every_dtype_byte_for_byte(dtype):
    with HostTier(HostTierConfig(budget_bytes=4 * MiB, slab_bytes=MiB)) as host:
        t = (torch.randn(3, 1001) * 100).to(dtype)
        _, out = _roundtrip(host, t)
        assert torch.equal(out, t) and out.dtype == dtype


def test_host_tier_accepts_non_contiguous_sources_and_scalars():
    with HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB)) as host:
        t = torch.randn(64, 32).t()
        slot = host.reserve(t.nbytes)
        host.write(slot, t).wait()
        out = torch.empty(t.shape)
        host.read(slot, out).wait()
        assert torch.equal(out, t)
        s = torch.tensor(3.5)
        _, out = _roundtrip(host, s)
        assert torch.equal(out, s)


def test_host_budget_error_names_the_budget_and_the_setting():
    with HostTier(HostTierConfig(budget_bytes=2 * MiB, slab_bytes=MiB)) as host:
        host.reserve(MiB)
        with pytest.raises(TierFullError) as err:
            host.reserve(MiB + 1)
        msg = str(err.value)
        assert "tiers.host.budget_bytes=2097152" in msg and "raise tiers.host.budget_bytes" in msg
        assert host.used_bytes == MiB  # the failed request took nothing


def test_host_pool_never_exceeds_budget_plus_one_slab():
    budget, slab = 6 * MiB, MiB
    rng = random.Random(1)
    with HostTier(HostTierConfig(budget_bytes=budget, slab_bytes=slab)) as host:
        live = []
        for _ in range(600):
            if live and rng.random() < 0.45:
                host.free(live.pop(rng.randrange(len(live))))
            else:
                try:
                    live.append(host.reserve(rng.choice([4096, 50_000, 700_000, 3 * MiB])))
                except TierFullError:
                    pass
            assert host.used_bytes <= budget
            assert host.pool_bytes <= budget + slab
        assert host.capacity_bytes == budget


def test_host_tier_slabs_are_allocated_once_and_reused():
    with HostTier(HostTierConfig(budget_bytes=4 * MiB, slab_bytes=2 * MiB)) as host:
        for _ in range(50):
            host.free(host.reserve(MiB))
        assert host.pool_bytes == 2 * MiB
        big = host.reserve(3 * MiB)  # larger than a slab: a slab of its own size
        assert host.pool_bytes == 5 * MiB
        host.free(big)


def test_misuse_gets_clear_errors():
    with HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB)) as host:
        with pytest.raises(ValueError, match="positive integer"):
            host.reserve(0)
        slot = host.reserve(16)
        with pytest.raises(ValueError, match="sizes must match"):
            host.write(slot, torch.zeros(5))
        with pytest.raises(TierError, match="never written"):
            host.read(slot, torch.zeros(4))
        host.write(slot, torch.ones(4)).wait()
        with pytest.raises(ValueError, match="non-contiguous"):
            host.read(slot, torch.zeros(2, 2).t())
        host.free(slot)
        with pytest.raises(KeyError, match="not live"):
            host.free(slot)
    with pytest.raises(TierError, match="closed"):
        host.reserve(16)


def test_read_right_after_write_sees_the_new_bytes():
    with HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB)) as host:
        slot = host.reserve(4000 * 4)
        outs = []
        for i in range(20):  # no waits: per-slot order is the tier's job
            host.write(slot, torch.full((4000,), float(i)))
            outs.append(torch.empty(4000))
            host.read(slot, outs[-1])
        host.free(slot)  # waits for the slot's transfers
        assert all(torch.equal(o, torch.full((4000,), float(i))) for i, o in enumerate(outs))


def test_aligned_empty_is_page_aligned():
    t = aligned_empty(3 * 4096 + 8, torch.float64)
    assert t.data_ptr() % 4096 == 0 and t.numel() == (3 * 4096 + 8) // 8
    with pytest.raises(ValueError):
        aligned_empty(6, torch.float32)


# --- numa tier ----------------------------------------------------------------------------------


def _fake_sysfs(root):
    """One CPU node with 16 GiB, two memory-only (CXL) nodes with 64 GiB each."""
    nodes = {0: ("0-3", 16, 12), 1: ("", 64, 60), 2: ("", 64, 63)}
    for node, (cpus, total_gib, free_gib) in nodes.items():
        d = root / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {node} MemTotal:       {total_gib << 20} kB\n"
                                   f"Node {node} MemFree:        {free_gib << 20} kB\n"
                                   f"Node {node} MemUsed:        {(total_gib - free_gib) << 20} kB\n")
        (d / "distance").write_text(" ".join("10" if i == node else "20" for i in nodes) + "\n")
    (root / "has_cpu").write_text("0\n")
    (root / "possible").write_text("0-2\n")
    return root


def test_numa_discovery_reads_a_fake_sysfs_tree(tmp_path):
    nodes = discover_numa_nodes(str(_fake_sysfs(tmp_path / "node")))
    assert [n.node_id for n in nodes] == [0, 1, 2]
    assert nodes[0].cpus == (0, 1, 2, 3) and not nodes[0].memory_only
    assert nodes[1].memory_only and nodes[2].memory_only
    assert nodes[1].total_bytes == 64 << 30 and nodes[2].free_bytes == 63 << 30
    assert nodes[0].distances == (10, 20, 20)
    assert "memory-only" in nodes[1].describe() and "CPUs 0-3" in nodes[0].describe()


def test_numa_tier_picks_memory_only_nodes_and_reports_refused_binding(tmp_path):
    cfg = NumaTierConfig(budget_bytes=4 * MiB, slab_bytes=MiB, sysfs_root=str(_fake_sysfs(tmp_path / "node")))
    with NumaTier(cfg) as tier:
        assert [n.node_id for n in tier.nodes] == [1, 2]  # the CXL expanders, striped
        assert tier.name == "numa:1,2"
        # This machine has no nodes 1 and 2: the kernel refuses and the error says what to check.
        with pytest.raises(TierError, match=r"mbind .* node\(s\) \[1, 2\] failed: .*tiers.numa.nodes"):
            tier.reserve(4096)


def test_numa_config_problems_are_reported_before_allocating(tmp_path):
    root = str(_fake_sysfs(tmp_path / "node"))
    with pytest.raises(TierConfigError, match="node 7, which does not exist"):
        NumaTier(NumaTierConfig(nodes=[7], sysfs_root=root))
    with pytest.raises(TierConfigError, match=r"budget_bytes=.* exceeds the free memory of node\(s\) \[1\]"):
        NumaTier(NumaTierConfig(nodes=[1], budget_bytes=61 << 30, sysfs_root=root))
    with pytest.raises(TierConfigError, match="no NUMA topology"):
        discover_numa_nodes(str(tmp_path / "missing"))


def test_numa_tier_binds_to_node_0_as_numa_maps_shows():
    with NumaTier(NumaTierConfig(nodes=[0], budget_bytes=4 * MiB, slab_bytes=2 * MiB)) as tier:
        t = torch.randn(100_000)
        _, out = _roundtrip(tier, t)
        assert torch.equal(out, t)
        slab = tier.pool._slabs[0]
        placement = numa_placement(slab.address)
        assert placement["policy"] == "bind:0"
        assert placement["pages"].get(0, 0) == slab.nbytes // 4096  # every page touched, all on node 0


def test_numa_tier_without_memory_only_nodes_warns_and_uses_node_0(tmp_path):
    root = tmp_path / "node"
    (root / "node0").mkdir(parents=True)
    (root / "node0" / "cpulist").write_text("0-1\n")
    (root / "node0" / "meminfo").write_text("Node 0 MemTotal: 8388608 kB\nNode 0 MemFree: 4194304 kB\n")
    with pytest.warns(UserWarning, match="no memory-only"):
        tier = NumaTier(NumaTierConfig(budget_bytes=MiB, slab_bytes=MiB, sysfs_root=str(root)))
    with tier:
        assert [n.node_id for n in tier.nodes] == [0]
