"""CUDA paths of the tiers (run only with a GPU; conftest skips them elsewhere).

Timings (pinned host<->device against a plain pinned copy) are in benchmarks/tiers_io.py, not here.
"""

import pytest
import torch

from tierflow.offload import HostTier, HostTierConfig, NumaTier, NumaTierConfig, NvmeTier, NvmeTierConfig

MiB = 1 << 20


def _device_roundtrip(tier, t):
    slot = tier.reserve(t.nbytes)
    tier.write(slot, t).wait()
    out = torch.empty_like(t)
    tier.read(slot, out).wait()
    return out


@pytest.mark.cuda
def test_host_pool_is_registered_for_dma_and_round_trips_device_tensors():
    with HostTier(HostTierConfig(budget_bytes=64 * MiB, slab_bytes=16 * MiB)) as host:
        t = torch.randn(3 * MiB, device="cuda")
        out = _device_roundtrip(host, t)
        assert torch.equal(out, t)
        assert host.pinned and host.pool._slabs[0].tensor.is_pinned()  # cudaHostRegister, not pin_memory


@pytest.mark.cuda
def test_write_waits_for_the_kernel_that_produced_the_tensor():
    with HostTier(HostTierConfig(budget_bytes=64 * MiB, slab_bytes=16 * MiB)) as host:
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            t = torch.zeros(4 * MiB, device="cuda")
            for _ in range(20):
                t.add_(1)  # queued work; the offload must see its end result
            slot = host.reserve(t.nbytes)
            handle = host.write(slot, t)
        handle.wait()
        out = torch.empty(4 * MiB)
        host.read(slot, out).wait()
        assert torch.equal(out, torch.full((4 * MiB,), 20.0))


@pytest.mark.cuda
def test_numa_tier_round_trips_device_tensors():
    with NumaTier(NumaTierConfig(nodes=[0], budget_bytes=32 * MiB, slab_bytes=16 * MiB)) as tier:
        t = torch.randint(0, 1000, (MiB,), device="cuda")
        assert torch.equal(_device_roundtrip(tier, t), t)


@pytest.mark.cuda
def test_device_tensor_round_trips_through_nvme_staged_through_pinned_buffers(tmp_path):
    with NvmeTier(NvmeTierConfig(enabled=True, dirs=[str(tmp_path)], backend="posix", checksum="crc32",
                                 chunk_bytes=MiB)) as tier:
        t = torch.randn(5 * MiB // 4 + 3, device="cuda")
        assert torch.equal(_device_roundtrip(tier, t), t)


@pytest.mark.cuda
def test_device_tensor_round_trips_through_kvikio(tmp_path):
    pytest.importorskip("kvikio")  # optional dependency: pip install kvikio-cu12
    with NvmeTier(NvmeTierConfig(enabled=True, dirs=[str(tmp_path)], backend="kvikio", checksum="xxh3",
                                 chunk_bytes=MiB)) as tier:
        assert tier.device_path.startswith("kvikio")
        t = torch.randn(3 * MiB + 5, device="cuda")
        assert torch.equal(_device_roundtrip(tier, t), t)


@pytest.mark.cuda
def test_the_runtime_table_moves_a_tensor_out_and_back_without_blocking_the_host():
    from tierflow.offload.runtime._residency import Residency

    with HostTier(HostTierConfig(budget_bytes=64 * MiB, slab_bytes=16 * MiB)) as host:
        table = Residency(lambda name: host)
        t = torch.randn(4 * MiB, device="cuda")
        want = t.clone()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of queued compute the copies must wait behind
        t.mul_(2)
        table.offload("t", t.untyped_storage(), "host")
        table.release("t")
        table.prefetch("t")
        table.arrive("t")
        # The host queued all of it and got here while the compute stream was still asleep.
        assert not torch.cuda.current_stream().query()
        assert torch.equal(t, want * 2)  # the compute stream waited for the copy back
        assert table.stats.stall_s < 0.05
