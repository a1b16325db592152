"""Stream-ordered device copies (Note [stream-ordered copies]), checked on CPU.

The pooled tier and the residency table run against :class:`tests.stream_sim.SimStreams`, which
gives CPU tensors CUDA's stream semantics: side-stream copies run as late as CUDA allows, a free or
a reuse not ordered after them fails at once, and a tensor used before its copy back reads NaN.
Each rule is also broken on purpose once, to show the checker would catch it.
"""

import pytest
import torch

from tests.stream_sim import SimOrderError, SimStreams
from tests.test_runtime import assert_identical, batches, gpt, host_tiers, train
from tierflow.offload import HostTierConfig, OffloadConfig
from tierflow.offload.runtime._residency import Residency
from tierflow.offload.tiers.engine import TierEngine
from tierflow.offload.tiers.host import HostTier
from tierflow.offload.tiers.streams import StreamHandle


@pytest.fixture
def host():
    tier = HostTier(HostTierConfig(enabled=True, budget_bytes=1 << 20, slab_bytes=1 << 20))
    tier.streams = SimStreams(progress=0.0)  # copies run only when something forces them
    yield tier
    tier.close()


def _kinds(log, start=0):
    return [entry if entry[0] != "record" else ("record", entry[1]) for entry in log[start:]]


def test_a_round_trip_waits_on_the_device_and_never_on_the_host(host):
    sim = host.streams
    table = Residency(lambda name: host)
    t = torch.arange(1024, dtype=torch.float32)
    want = t.clone()
    storage = t.untyped_storage()

    assert table.offload("x", storage, "host")
    assert sim.pending() == 1  # queued, not run: the host did not wait
    table.release("x")
    assert storage.nbytes() == 0
    # ready -> copy out -> its event -> the compute stream waits -> the free
    assert _kinds(sim.log) == [("record", "compute"), ("wait", "out", "compute"), ("copy", "out"),
                               ("record", "out"), ("wait", "compute", "out"), ("free",)]

    mark = len(sim.log)
    table.prefetch("x")
    assert storage.nbytes() == t.nbytes and torch.isnan(t).all()  # grown, its bytes not back yet
    assert sim.pending() == 1
    table.arrive("x")
    assert _kinds(sim.log, mark) == [("grow",), ("record", "compute"), ("wait", "in", "compute"),
                                     ("copy", "in"), ("record", "in"), ("wait", "compute", "in")]
    assert torch.equal(t, want)
    assert sim.host_syncs == 0
    assert host.num_slots == 0 and host.used_bytes == 0  # the read was done: its slot went back at once


def test_a_slot_freed_while_its_copy_may_run_is_not_handed_out_again(host):
    sim = host.streams
    src = torch.arange(4096, dtype=torch.uint8)
    slot = host.reserve(src.nbytes)
    host.write(slot, src).wait()
    dst = torch.empty_like(src)
    read = host.read(slot, dst)
    host.free(slot)  # the read is still queued: the slot's memory stays taken
    assert not read.done() and host.used_bytes >= src.nbytes
    other = host.reserve(src.nbytes)
    host.write(other, torch.zeros_like(src))  # a different extent: no race with the queued read
    sim.drain()
    assert torch.equal(dst, src)
    host.free(other)
    host.reserve(8)  # reclaims what is done
    assert host.used_bytes <= 4096


def test_the_checker_catches_each_missing_order(host, monkeypatch):
    sim = host.streams
    table = Residency(lambda name: host)

    # Rule 3 broken: the compute stream does not wait for a copy back; the tensor reads poison.
    t = torch.arange(256, dtype=torch.float32)
    table.offload("a", t.untyped_storage(), "host")
    table.release("a")
    table.prefetch("a")
    with monkeypatch.context() as m:
        m.setattr(StreamHandle, "order_compute", lambda self: None)
        table.arrive("a")
    assert torch.isnan(t).all()
    sim.drain()

    # Rule 2 broken: the storage is freed before the copy out ran.
    u = torch.arange(256, dtype=torch.float32)
    table.offload("b", u.untyped_storage(), "host")
    with monkeypatch.context() as m:
        m.setattr(StreamHandle, "order_compute", lambda self: None)
        with pytest.raises(SimOrderError, match="freed while a copy"):
            table.release("b")
    sim.drain()

    # Rule 4 broken: a freed slot is handed out while a read from it is still queued.
    src = torch.arange(4096, dtype=torch.uint8)
    slot = host.reserve(src.nbytes)
    host.write(slot, src).wait()
    host.read(slot, torch.empty_like(src))
    with monkeypatch.context() as m:
        m.setattr(StreamHandle, "done", lambda self: True)  # reads as finished: released at once
        m.setattr(StreamHandle, "exception", lambda self, timeout=None: None)
        host.free(slot)
        again = host.reserve(src.nbytes)
    with pytest.raises(SimOrderError, match="no event between them"):
        host.write(again, torch.zeros_like(src))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_training_run_on_stream_ordered_copies_is_bit_identical(seed):
    data = batches(12)
    ref = train(gpt, data)
    engine = TierEngine(host_tiers())
    sim = engine.host.streams = SimStreams(seed=seed)
    try:
        got = train(gpt, data, OffloadConfig(policy="lifetime", device_budget_fraction=0.5), engine)
    finally:
        engine.close()
    assert_identical(ref, got)
    summary = got[2].summary()
    assert summary["steps"]["planned"] >= 6 and sum(summary["bytes_out"].values()) > 0
    assert sim.copies > 100
    assert sim.host_syncs == 0  # the training thread never waited for a device copy
