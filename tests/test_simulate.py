"""The simulator against timelines computed by hand (tests/test_plan_fixtures.py explains the traces)."""

import pytest

from tests.test_plan_fixtures import hardware, make_trace, tensor, toy_trace
from tierflow.offload.plan.simulate import simulate
from tierflow.offload.plan.types import Action, Decision, OffloadPlan, PlanningError
from tierflow.profiling.trace import Category


def _plan(trace, decisions, budget=1100):
    return OffloadPlan(policy="hand", hardware="toy", num_points=len(trace.points), device_budget_bytes=budget,
                       decisions=tuple(decisions))


def _swap_x(evict=1, free=2, prefetch=3, deadline=4):
    return Decision(key="X", record=1, category="activation", size_bytes=100, action=Action.SWAP, tier="host",
                    evict_point=evict, free_point=free, prefetch_point=prefetch, deadline_point=deadline)


def test_no_transfers_reproduces_the_sum_of_compute_exactly():
    compute = [0.1, 0.2, 0.3, 0.7, 1e-9, 0.45, 0.0]
    trace = make_trace(compute, [tensor("a", 8, (1, 5), created=1, freed=5)])
    sim = simulate(trace, _plan(trace, ()))
    assert sim.step_s == sum(compute)
    assert sim.stall_s == 0 and sim.stalls == () and sim.link_bytes == ()
    assert sim.peak_bytes == (("device", 8),)


def test_overlap_hides_a_transfer():
    # 100 B at 100 B/s: out during interval 1 (done at t=2, when compute reaches point 2 and the
    # memory is released), back during interval 3 (issued at t=3, arrives at t=4 = point 4).
    trace = toy_trace()
    sim = simulate(trace, _plan(trace, [_swap_x()]), hardware(bandwidth=100.0))
    assert sim.step_s == 4.0
    assert sim.stalls == ()
    assert sim.point_times_s == (0.0, 1.0, 2.0, 3.0, 4.0, 4.0)
    assert dict(sim.peak_bytes) == {"device": 1100, "host": 100}
    assert sim.link_bytes == (("device->host", 100), ("host->device", 100))


def test_too_little_bandwidth_stalls_by_the_computed_amount():
    # 50 B/s: each transfer takes 2 s. Out issued at t=1 ends at 3: compute waits 1 s at point 2.
    # Point 3 is reached at 4; the prefetch issued then ends at 6: compute waits 1 s at point 4.
    trace = toy_trace()
    sim = simulate(trace, _plan(trace, [_swap_x()]), hardware(bandwidth=50.0))
    assert sim.stalls == ((2, 1.0), (4, 1.0))
    assert sim.step_s == 6.0 and sim.stall_s == 2.0
    assert sim.point_times_s == (0.0, 1.0, 3.0, 4.0, 6.0, 6.0)


def test_latency_and_concurrency():
    # Two 100 B tensors leave at point 1 over a 100 B/s link with 0.5 s latency. With two in
    # flight the latencies overlap: done at 1.5 and 2.5. One at a time: 2.5 and then 1+1.5+1.5 = 4.0.
    tensors = [tensor("Y", 1000, range(6), category=Category.INPUT),
               tensor("A", 100, (0, 4), created=0, freed=4), tensor("B", 100, (0, 4), created=0, freed=4)]
    trace = make_trace([0, 1, 1, 1, 1, 0], tensors)
    decisions = [Decision(key=k, record=r, category="activation", size_bytes=100, action=Action.SWAP, tier="host",
                          evict_point=1, free_point=3, prefetch_point=4, deadline_point=4) for k, r in (("A", 1), ("B", 2))]
    both = simulate(trace, _plan(trace, decisions, 1200), hardware(bandwidth=100.0, latency=0.5, concurrency=2))
    # Out: done at 2.5 and 3.5 > T(3)=3: wait 0.5. Back issued at 4.5: 5.0+1=6.0 and 7.0: wait from 4.5 to 7.0.
    assert both.stalls == ((3, 0.5), (4, 2.5))
    assert both.step_s == 7.0
    serial = simulate(trace, _plan(trace, decisions, 1200), hardware(bandwidth=100.0, latency=0.5, concurrency=1))
    # Out: 2.5 and 4.0: wait 1.0 at point 3 (T=4). Back issued at 5: 6.5 and 8.0.
    assert serial.stalls == ((3, 1.0), (4, 3.0))
    assert serial.step_s == 8.0


def test_wrapped_state_steady_state():
    # An optimizer state used only at point 3 idles from point 4 around to point 3. It leaves at
    # point 4 (t=4), is freed from interval 1 of the next iteration, comes back from point 2.
    tensors = [tensor("Y", 1000, range(6), category=Category.INPUT),
               tensor("S", 100, (3,), category=Category.OPTIMIZER_STATE)]
    trace = make_trace([0, 1, 1, 1, 1, 0], tensors)
    d = Decision(key="S", record=1, category="optimizer_state", size_bytes=100, action=Action.SWAP, tier="host",
                 evict_point=4, free_point=1, prefetch_point=2, deadline_point=3, wraps=True)
    fast = simulate(trace, _plan(trace, [d]), hardware(bandwidth=100.0))
    assert fast.step_s == 4.0 and fast.stalls == ()
    # At 50 B/s the previous iteration's write (issued at its point 4, t=5) ends 2 s later, 1 s
    # into this iteration: compute waits 1 s at point 1, and 1 s at point 3 for the prefetch.
    slow = simulate(trace, _plan(trace, [d]), hardware(bandwidth=50.0))
    assert slow.stalls == ((1, 1.0), (3, 1.0))
    assert slow.step_s == 6.0


def test_recompute_costs_compute_once_per_block():
    trace = toy_trace()
    d = Decision(key="X", record=1, category="activation", size_bytes=100, action=Action.RECOMPUTE, tier="",
                 evict_point=1, free_point=1, prefetch_point=4, deadline_point=4, recompute_block="m[0]", recompute_s=0.25)
    sim = simulate(trace, _plan(trace, [d]))
    assert sim.step_s == 4.25 and sim.stall_s == 0 and sim.recompute_s == 0.25
    assert dict(sim.peak_bytes)["device"] == 1100  # intervals 0 and 4 still hold X


def test_plan_for_another_trace_or_missing_link_is_refused():
    trace = toy_trace()
    with pytest.raises(PlanningError, match="6 points"):
        simulate(make_trace([0, 1, 0], []), _plan(trace, ()))
    bad = Decision(key="X", record=1, category="activation", size_bytes=100, action=Action.SWAP, tier="nvme:7",
                   evict_point=1, free_point=2, prefetch_point=3, deadline_point=4)
    with pytest.raises(PlanningError, match="no link device->nvme:7"):
        simulate(trace, _plan(trace, [bad]), hardware())
