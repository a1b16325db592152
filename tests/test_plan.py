"""OffloadPlan data, validate_plan, and every policy on hand-built traces with hand-computed answers."""

import os
import stat

import pytest

from tests.test_plan_fixtures import hardware, make_trace, tensor, toy_trace
from tierflow.offload.plan import POLICIES, Budgets, make_plan
from tierflow.offload.plan.types import Action, Decision, OffloadPlan, PlanFileError, PlanningError, validate_plan
from tierflow.profiling.trace import Category, PointKind

X_SWAP = dict(key="X", record=1, category="activation", size_bytes=100, action=Action.SWAP, tier="host",
              evict_point=1, free_point=2, prefetch_point=3, deadline_point=4)


def _fields(d):
    return (d.key, d.action, d.tier, d.evict_point, d.free_point, d.prefetch_point, d.deadline_point, d.wraps)


def test_lifetime_equals_the_hand_computed_optimum():
    # Only interval 2 (1150 B) is over the 1100 B budget; X idles 3 s from point 1 to 4 and its
    # round trip to host takes 2 s: it leaves during interval 1 and returns during interval 3,
    # so the peak fits with no stall (the optimum: nothing faster exists).
    trace = toy_trace()
    plan = make_plan(trace, hardware(bandwidth=100.0), Budgets(device_bytes=1100))
    assert [_fields(d) for d in plan.decisions] == [("X", Action.SWAP, "host", 1, 2, 3, 4, False)]
    assert plan.fits and plan.predicted_step_s == 4.0 == plan.unconstrained_step_s
    assert dict(plan.predicted_peak_bytes) == {"device": 1100, "host": 100}
    assert "idle 3000.000 ms" in plan.decisions[0].reason and "round trip 2000.000 ms to host" in plan.decisions[0].reason
    assert validate_plan(plan, trace, hardware()) == []


def test_lifetime_prefers_the_cheapest_tier_that_hides_and_spills_when_full():
    trace = toy_trace()
    hw = hardware(bandwidth=100.0, nvme_bandwidth=100.0)
    assert make_plan(trace, hw, Budgets(device_bytes=1100)).decisions[0].tier == "nvme:0"
    spilled = make_plan(trace, hw, Budgets(device_bytes=1100, tier_bytes=(("nvme:0", 50),)))
    assert spilled.decisions[0].tier == "host" and "spilled past full nvme:0" in spilled.decisions[0].reason
    # NVMe too slow to hide the 3 s window (2 x 2 s): host, although NVMe is cheaper.
    slow = make_plan(trace, hardware(bandwidth=100.0, nvme_bandwidth=50.0), Budgets(device_bytes=1100))
    assert slow.decisions[0].tier == "host"


def test_exposed_swap_when_no_tier_hides_the_window():
    # At 50 B/s the round trip (4 s) exceeds X's 3 s window and X is no recomputable activation:
    # X is still swapped so that interval 2 fits; out from point 1 and back from point 3 each wait
    # 1 s (tests/test_simulate.py computes this timeline by hand).
    trace = toy_trace()
    plan = make_plan(trace, hardware(bandwidth=50.0), Budgets(device_bytes=1100))
    assert [_fields(d) for d in plan.decisions] == [("X", Action.SWAP, "host", 1, 2, 3, 4, False)]
    assert "shorter than the round trip" in plan.decisions[0].reason
    assert plan.fits and plan.predicted_step_s == 6.0 and plan.predicted_stall_s == 2.0


def test_nothing_moves_when_the_budget_fits():
    plan = make_plan(toy_trace(), hardware(), Budgets(device_fraction=1.0))
    assert plan.decisions == () and plan.fits and plan.device_budget_bytes == 1150
    assert "nothing moves" in plan.notes[0]


def test_budget_below_the_feasible_minimum_states_it():
    # Intervals 0 and 4 hold X and Y while X is in use there: 1100 B is the least any plan reaches.
    with pytest.raises(PlanningError, match=r"below the feasible minimum 1100 bytes .* at least 1100 bytes"):
        make_plan(toy_trace(), hardware(), Budgets(device_bytes=1099))


def test_unknown_policy_and_tier_budget_are_clear_errors():
    with pytest.raises(PlanningError, match="unknown offload policy 'lru'; choose one of: lifetime"):
        make_plan(toy_trace(), hardware(), Budgets(), "lru")
    with pytest.raises(PlanningError, match=r"unknown tier\(s\) \['numa:9'\]"):
        make_plan(toy_trace(), hardware(), Budgets(tier_bytes=(("numa:9", 1),)))
    with pytest.raises(PlanningError, match="must be > 0"):
        Budgets(device_fraction=0)


def _recompute_trace():
    # Module m runs 0.5 s in forward (points 1->2) and saves A (100 B); A is next used at point 4,
    # 2 s later. At 20 B/s a round trip takes 10 s: recomputing m (0.5 s) is cheaper.
    kinds = [(PointKind.FORWARD_PRE, "m", 0), (PointKind.FORWARD_POST, "m", 0), (PointKind.BACKWARD_PRE, "m", 0),
             (PointKind.BACKWARD_POST, "m", 0)]
    return make_trace([0, 0, 0.5, 1, 1, 0], [
        tensor("Y", 1000, range(6), category=Category.INPUT),
        tensor("m[0]:saved0", 100, (1, 4), created=1, freed=4),
        tensor("Z", 50, (2,), created=2, freed=2, category=Category.TEMPORARY),
    ], kinds)


def test_recompute_when_cheaper_than_the_round_trip():
    trace = _recompute_trace()
    plan = make_plan(trace, hardware(bandwidth=20.0), Budgets(device_bytes=1100))
    (d,) = plan.decisions
    assert (d.action, d.evict_point, d.free_point, d.prefetch_point, d.deadline_point) == (Action.RECOMPUTE, 2, 2, 4, 4)
    assert d.recompute_block == "m[0]" and d.recompute_s == 0.5 and plan.recomputed_blocks == ("m[0]",)
    assert plan.predicted_step_s == 3.0 and plan.fits
    assert validate_plan(plan, trace, hardware()) == []


def test_ilp_matches_the_hand_computed_optimum():
    trace = toy_trace()
    plan = make_plan(trace, hardware(bandwidth=100.0), Budgets(device_bytes=1100), "ilp")
    assert [_fields(d) for d in plan.decisions] == [("X", Action.SWAP, "host", 1, 2, 3, 4, False)]
    assert plan.predicted_step_s == 4.0
    rec = make_plan(_recompute_trace(), hardware(bandwidth=20.0), Budgets(device_bytes=1100), "ilp")
    assert [(d.action, d.recompute_block) for d in rec.decisions] == [(Action.RECOMPUTE, "m[0]")]
    assert rec.predicted_step_s == 3.0
    with pytest.raises(PlanningError, match="feasible minimum 1100 bytes"):
        make_plan(trace, hardware(), Budgets(device_bytes=1099), "ilp")


def test_baselines_hand_computed():
    trace, hw = toy_trace(), hardware(bandwidth=100.0)
    # belady: over budget at point 2 only, X is the idle tensor: evicted there (compute waits 1 s
    # for the write) and fetched on demand at 4 (waits 1 s more).
    belady = make_plan(trace, hw, Budgets(device_bytes=1100), "belady")
    assert [_fields(d) for d in belady.decisions] == [("X", Action.SWAP, "host", 2, 2, 4, 4, False)]
    assert belady.predicted_step_s == 6.0 and belady.fits
    # all_host: X copied when saved (waits 1 s at point 1), fetched when unpacked (1 s at point 4).
    host = make_plan(trace, hw, Budgets(device_bytes=1100), "all_host")
    assert [_fields(d) for d in host.decisions] == [("X", Action.SWAP, "host", 1, 1, 4, 4, False)]
    assert host.predicted_step_s == 6.0
    none = make_plan(trace, hw, Budgets(device_bytes=1100), "none")
    assert none.decisions == () and not none.fits and none.predicted_step_s == 4.0


def _mixed_trace():
    # Parameters, gradients, optimizer states (never freed: they wrap) and activations.
    t = [tensor("w", 400, (1, 6, 8), category=Category.PARAM), tensor("s", 800, (8,), category=Category.OPTIMIZER_STATE),
         tensor("w:grad", 400, (6, 8), created=6, freed=8, category=Category.GRAD),
         tensor("a1", 300, (1, 6), created=1, freed=6), tensor("a2", 300, (2, 5), created=2, freed=5),
         tensor("t", 200, (4,), created=4, freed=4, category=Category.TEMPORARY)]
    return make_trace([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], t)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_plans_validate_and_round_trip(policy, tmp_path):
    trace, hw = _mixed_trace(), hardware(bandwidth=1000.0, nvme_bandwidth=1000.0)
    budget = Budgets(device_fraction=0.8)
    plan = make_plan(trace, hw, budget, policy)
    problems = validate_plan(plan, trace, hw)
    assert (problems == []) == plan.fits
    assert all("budget exceeded" in p for p in problems)
    assert OffloadPlan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "plan.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and OffloadPlan.load(path) == plan
    assert all(d.reason for d in plan.decisions)


def test_lifetime_fits_where_baselines_do_not_and_never_loses():
    trace, hw = _mixed_trace(), hardware(bandwidth=1000.0, nvme_bandwidth=1000.0)
    budget = Budgets(device_fraction=0.8)
    life = make_plan(trace, hw, budget)
    assert life.fits and validate_plan(life, trace, hw) == [] and life.predicted_step_s == life.unconstrained_step_s
    for policy in ("belady", "all_host", "zero_offload", "zero_infinity"):
        other = make_plan(trace, hw, budget, policy)
        assert not other.fits or other.predicted_step_s >= life.predicted_step_s


def test_validate_plan_reports_every_violation_at_once():
    trace = toy_trace()
    early = Decision(**{**X_SWAP, "key": "Y", "record": 0, "size_bytes": 1000})  # Y is used at 2 and 3
    late = Decision(**{**X_SWAP, "prefetch_point": 5})  # comes back after its next use
    plan = OffloadPlan(policy="hand", hardware="toy", num_points=6, device_budget_bytes=1000,
                       decisions=(early, late))
    problems = validate_plan(plan, trace, hardware())
    assert any("decision 0 ('Y'): used at point 1 before arrival" in p for p in problems)
    assert any("decision 1 ('X')" in p and "not back before its next use" in p for p in problems)
    assert any(p.startswith("device budget exceeded at interval 0: 1100 bytes > 1000 bytes") for p in problems)
    assert len(problems) == 3


def test_validate_plan_other_trace_and_unknown_tier():
    plan = OffloadPlan(policy="hand", hardware="toy", num_points=6, device_budget_bytes=2000,
                       decisions=(Decision(**{**X_SWAP, "tier": "numa:4"}),))
    assert validate_plan(plan, make_trace([0, 1, 0], []))[0].startswith("plan is for a trace of 6 points")
    assert validate_plan(plan, toy_trace(), hardware()) == [
        "decision 0 ('X'): tier 'numa:4' is not an offload tier of 'toy' (device, host)"]


def test_plan_file_errors():
    with pytest.raises(PlanFileError, match="does not exist"):
        OffloadPlan.load("/nonexistent/plan.json")
    with pytest.raises(PlanFileError, match="not JSON"):
        OffloadPlan.from_json("{")
    with pytest.raises(PlanFileError, match="unknown key"):
        OffloadPlan.from_json('{"policy": "x", "bogus": 1}')
