"""Small tensors of one point move as one transfer (Note [packs] in offload/runtime/_packs.py)."""

import pytest
import torch

from tests.stream_sim import SimStreams
from tierflow.offload import HostTierConfig
from tierflow.offload.core.errors import TierFullError
from tierflow.offload.runtime._packs import ALIGN, PACK_BYTES, PACK_LIMIT, layout
from tierflow.offload.runtime._residency import Residency
from tierflow.offload.tiers.host import HostTier


@pytest.fixture(params=["host copies", "stream-ordered"])
def host(request):
    tier = HostTier(HostTierConfig(enabled=True, budget_bytes=8 << 20, slab_bytes=8 << 20))
    if request.param == "stream-ordered":
        tier.streams = SimStreams(seed=3)
    yield tier
    tier.close()


def _tensors(sizes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n // 4, generator=gen) for n in sizes]


def _transfers(tier):
    return {"host copies": sum(s.completed for s in tier.scheduler.stats().values()),
            "stream-ordered": getattr(tier.streams, "copies", 0)}


def test_the_small_tensors_of_a_point_share_one_slot_and_come_back_exactly(host):
    table = Residency(lambda name: host)
    small = _tensors([4096, 1024, 65536, 12, 4096 + 4])  # the 12-byte one is 3 floats
    big = _tensors([PACK_BYTES + 4096])[0]
    want = [t.clone() for t in small + [big]]
    with table.batch():
        for i, t in enumerate(small + [big]):
            assert table.offload(f"t{i}", t.untyped_storage(), "host")
        assert host.num_slots == 1  # the large one left at once; the small ones wait for the batch's end
    assert host.num_slots == 2  # one pack of five, the large one alone
    for i in range(6):
        table.release(f"t{i}")
    assert all(t.untyped_storage().nbytes() == 0 for t in small + [big])

    # Members come back in two batches (two prefetch points) and one on demand.
    with table.batch():
        for i in (0, 2):
            table.prefetch(f"t{i}")
    table.arrive("t0")
    table.arrive("t2")
    assert host.num_slots == 2  # the pack stays while members are away
    with table.batch():
        table.prefetch("t1")
        table.prefetch("t5")
    for i in (1, 5, 3, 4):  # t3, t4: fetched on demand at their use
        table.arrive(f"t{i}")
    assert all(torch.equal(a, b) for a, b in zip(small + [big], want))
    assert host.num_slots == 0 and not table.entries


def test_a_pack_is_freed_when_its_last_member_dies_or_comes_back(host):
    table = Residency(lambda name: host)
    ts = _tensors([2048] * 4)
    keep = ts[3].clone()
    with table.batch():
        for i, t in enumerate(ts):
            table.offload(f"t{i}", t.untyped_storage(), "host")
    for i in range(4):
        table.release(f"t{i}")
    del ts[:3]  # three members die while away
    table.drop_dead()
    assert host.num_slots == 1
    table.arrive("t3")
    assert torch.equal(ts[0], keep)
    assert host.num_slots == 0


def test_parameters_and_lone_tensors_move_on_their_own():
    with HostTier(HostTierConfig(enabled=True, budget_bytes=1 << 20, slab_bytes=1 << 20)) as host:
        versions = {"w": 0}
        table = Residency(lambda name: host, version_of=versions.get)
        w, a, b = _tensors([1024, 1024, 1024])
        with table.batch():
            table.offload("w", w.untyped_storage(), "host")  # a parameter: keeps a clean copy of its own
            table.offload("a", a.untyped_storage(), "host")
        assert host.num_slots == 2 and all(e.pack is None for e in table.entries.values())
        with table.batch():
            table.offload("b", b.untyped_storage(), "host")
        assert table.entries["b"].pack is None


def test_a_full_tier_leaves_every_tensor_of_the_batch_where_it_was():
    with HostTier(HostTierConfig(enabled=True, budget_bytes=64 << 10, slab_bytes=64 << 10)) as host:
        table = Residency(lambda name: host)
        ts = _tensors([40 << 10, 40 << 10])
        want = [t.clone() for t in ts]
        with pytest.raises(TierFullError):
            with table.batch():
                for i, t in enumerate(ts):
                    table.offload(f"t{i}", t.untyped_storage(), "host")
        assert not table.entries and host.num_slots == 0
        assert all(torch.equal(a, b) for a, b in zip(ts, want))


def test_layout_aligns_members_and_splits_at_the_pack_limit():
    class E:
        def __init__(self, n):
            self.nbytes = n

    packs = layout([E(10), E(100), E(PACK_LIMIT - 100), E(5)])
    assert [len(m) for m, _, _ in packs] == [2, 2]
    members, offsets, size = packs[0]
    assert offsets == [0, ALIGN * 1] and size == ALIGN + 100
    assert all(o % ALIGN == 0 for _, offs, _ in packs for o in offs)
    assert all(size <= PACK_LIMIT for _, _, size in packs)


def test_a_point_of_many_small_tensors_costs_one_transfer_each_way(host):
    table = Residency(lambda name: host)
    ts = _tensors([1024] * 50)
    before = _transfers(host)
    with table.batch():
        for i, t in enumerate(ts):
            table.offload(f"t{i}", t.untyped_storage(), "host")
    for i in range(50):
        table.release(f"t{i}")
    with table.batch():
        for i in range(50):
            table.prefetch(f"t{i}")
    for i in range(50):
        table.arrive(f"t{i}")
    after = _transfers(host)
    kind = "host copies" if host.streams is None else "stream-ordered"
    # Host copies: one task each way. Streams: a copy per member, but one event and one handle.
    assert after[kind] - before[kind] == (2 if kind == "host copies" else 100)
    assert host.num_slots == 0


def test_a_piece_outside_its_slot_is_refused_before_any_copy():
    with HostTier(HostTierConfig(enabled=True, budget_bytes=1 << 20, slab_bytes=1 << 20)) as host:
        slot = host.reserve(1000)
        with pytest.raises(ValueError, match="do not fit slot"):
            host.write_packed(slot, [(0, torch.zeros(100)), (900, torch.zeros(100))])  # 400 bytes at 900
        with pytest.raises(ValueError, match="non-contiguous"):
            host.write_packed(slot, [(0, torch.zeros(10, 10).t())])
        host.write_packed(slot, [(0, torch.ones(100)), (512, torch.full((100,), 2.0))])
        a, b = torch.empty(100), torch.empty(100)
        host.read_packed(slot, [(512, b), (0, a)]).wait()
        assert torch.equal(a, torch.ones(100)) and torch.equal(b, torch.full((100,), 2.0))
