"""Host-memory admission for every rank on a node (offload/tiers/capacity.py)."""

import pytest

from tierflow.offload.core.errors import TierConfigError
from tierflow.offload.tiers.capacity import check_host_memory, host_demand
from tierflow.offload.tiers.config import HostTierConfig, NumaTierConfig, TiersConfig

GiB = 1 << 30
SLAB = 64 << 20


def _tiers(host_gib, numa_gib=None, numa_nodes=()):
    numa = NumaTierConfig(enabled=numa_gib is not None, budget_bytes=(numa_gib or 1) * GiB, nodes=list(numa_nodes))
    return TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=host_gib * GiB), numa=numa)


def test_demand_counts_every_rank_pool_and_process():
    d = host_demand(_tiers(6), ranks_on_node=8, process_bytes_per_rank=2 * GiB, total_bytes=64 * GiB,
                    reserve_bytes=2 * GiB)
    assert d.pool_bytes_per_rank == 6 * GiB + SLAB
    assert d.need_bytes == 8 * (6 * GiB + SLAB + 2 * GiB)
    assert not d.fits
    # The largest pool that fits: 62 GiB / 8 ranks - 2 GiB of process memory.
    assert d.largest_pool_per_rank() == 62 * GiB // 8 - 2 * GiB


def test_one_rank_fits_where_eight_do_not():
    one = host_demand(_tiers(4), ranks_on_node=1, process_bytes_per_rank=2 * GiB, total_bytes=64 * GiB)
    check_host_memory(one)  # 6 GiB of 64: fine
    eight = host_demand(_tiers(6), ranks_on_node=8, process_bytes_per_rank=2 * GiB, total_bytes=64 * GiB,
                        reserve_bytes=2 * GiB)
    with pytest.raises(TierConfigError) as e:
        check_host_memory(eight)
    msg = str(e.value)
    assert "8 rank(s) on this node" in msg and "64.00 GiB" in msg
    assert "tiers.host.budget_bytes" in msg and "5.75 GiB" in msg  # 62/8 - 2


def test_numa_pool_counts_only_when_it_may_land_in_dram():
    cxl = host_demand(_tiers(1, numa_gib=8, numa_nodes=[2]), ranks_on_node=1, process_bytes_per_rank=0,
                      total_bytes=64 * GiB)
    dram = host_demand(_tiers(1, numa_gib=8), ranks_on_node=1, process_bytes_per_rank=0, total_bytes=64 * GiB)
    assert cxl.pool_bytes_per_rank == 1 * GiB + SLAB
    assert dram.pool_bytes_per_rank == 9 * GiB + 2 * SLAB


def test_default_reserve_is_at_least_one_gib():
    d = host_demand(TiersConfig(), ranks_on_node=2, process_bytes_per_rank=GiB, total_bytes=8 * GiB)
    assert d.reserve_bytes == GiB and d.pool_bytes_per_rank == 0
    with pytest.raises(ValueError, match="ranks_on_node=0"):
        host_demand(TiersConfig(), ranks_on_node=0, process_bytes_per_rank=0, total_bytes=GiB)


def test_the_ram_guard_counts_optimizer_state_only_where_it_stays_in_ram():
    """16 bytes per AdamW parameter in RAM without the tiered optimizer; 8 (weights and gradients)
    with it, whose states wait in the tiers (NVMe is not RAM; a host tier counts by its budget)."""
    from tierflow.trainer.compose import load_config
    from tierflow.trainer.preflight import dry_run, resident_training_state_bytes

    plain, _ = load_config(["trainer.device=cpu", "model=small"])
    tiered, _ = load_config(["trainer.device=cpu", "model=small", "optimizer.tiered.enabled=true",
                             "optimizer.tiered.paths=[nvme]", "tiers.nvme.enabled=true", "tiers.nvme.dirs=[/tmp]"])
    param_bytes = dry_run(plain)["param_bytes"]
    assert resident_training_state_bytes(plain) == 4 * param_bytes
    assert resident_training_state_bytes(tiered) == 2 * param_bytes
