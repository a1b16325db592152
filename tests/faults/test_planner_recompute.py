"""Recompute as the planner itself chooses it (issue 15, item 17).

Note [recompute regions] (in ``tierflow.offload.plan.context``) says which block may re-create an
activation and which blocks may be re-run together; the hand-built traces below check it per
policy.
"""

import pytest

from tests.test_plan_fixtures import hardware, make_trace, tensor
from tierflow.offload.plan import Action, Budgets, make_plan, validate_plan
from tierflow.profiling.trace import Category, PointKind

FP, FQ, BP = PointKind.FORWARD_PRE, PointKind.FORWARD_POST, PointKind.BACKWARD_PRE


def _nested_trace():
    """Block ``b`` calls ``b.e``; each saves a tensor it created (``e`` inside its own forward, ``b``
    after ``e`` returned). Temporary ``T`` makes interval 4, where both idle, need both gone."""
    kinds = [(FP, "b", 0), (FP, "b.e", 0), (FQ, "b.e", 0), (FQ, "b", 0), (BP, "b", 0), (BP, "b.e", 0)]
    return make_trace([0, 1, 1, 1, 1, 1, 1, 0], [
        tensor("Y", 1000, range(8), category=Category.INPUT),
        tensor("b.e[0]:saved0", 100, (2, 6), created=2, freed=6),
        tensor("b[0]:saved0", 100, (3, 5), created=3, freed=5),
        tensor("T", 100, (4,), created=4, freed=4, category=Category.TEMPORARY),
    ], kinds)


@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_no_recomputed_block_nests_in_another(policy):
    # Re-running b would re-run b.e unchecked: both recomputed would raise CheckpointError (or,
    # with matching shapes, hand back the wrong tensors). b.e is the cheaper block; b's tensor swaps.
    trace, hw = _nested_trace(), hardware(bandwidth=1.0)
    plan = make_plan(trace, hw, Budgets(device_bytes=1100), policy)
    assert plan.recomputed_blocks == ("b.e[0]",)
    assert {d.key: d.action for d in plan.decisions} == {"b.e[0]:saved0": Action.RECOMPUTE,
                                                         "b[0]:saved0": Action.SWAP}
    assert plan.fits and validate_plan(plan, trace, hw) == []


def _made_outside_trace(temporary_bytes: int):
    """Block ``b`` runs ``b.l`` then ``b.m``. ``b.m`` saves its input, made inside ``b`` but before
    ``b.m`` ran (a Linear after an activation function); ``b.l`` saves ``b``'s own input, which
    existed before ``b`` ran. Temporary ``T`` lives in intervals 5 and 6, where both idle."""
    kinds = [(FP, "b", 0), (FP, "b.l", 0), (FQ, "b.l", 0), (FP, "b.m", 0), (FQ, "b.m", 0), (FQ, "b", 0),
             (BP, "b", 0)]
    return make_trace([0, 1, 1, 1, 1, 1, 1, 1, 0], [
        tensor("Y", 1000, range(9), category=Category.INPUT),
        tensor("b.m[0]:saved0", 100, (3, 4, 7), created=3, freed=7),
        tensor("b.l[0]:saved0", 10, (0, 2, 7), created=0, freed=7),
        tensor("T", temporary_bytes, (5, 6), created=5, freed=6, category=Category.TEMPORARY),
    ], kinds)


@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_recompute_goes_through_the_block_that_created_the_activation(policy):
    # Re-running b.m alone re-creates nothing (checkpointing keeps its input): b.m's tensor comes
    # back by re-running b, the innermost block that made and saved it.
    trace, hw = _made_outside_trace(100), hardware(bandwidth=1.0)
    plan = make_plan(trace, hw, Budgets(device_bytes=1110), policy)
    assert [(d.key, d.action, d.recompute_block) for d in plan.decisions] == [
        ("b.m[0]:saved0", Action.RECOMPUTE, "b[0]")]
    assert plan.fits and validate_plan(plan, trace, hw) == []


@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_swaps_alone_when_a_recompute_would_pin_what_must_leave(policy):
    # Now both activations must leave. Re-running b would keep b's input (saved inside b, never
    # seen by the runtime's hooks) on the device, so no plan with a recompute fits: both swap.
    trace, hw = _made_outside_trace(110), hardware(bandwidth=1.0)
    plan = make_plan(trace, hw, Budgets(device_bytes=1110), policy)
    assert plan.recomputed_blocks == ()
    assert {d.key: d.action for d in plan.decisions} == {"b.m[0]:saved0": Action.SWAP, "b.l[0]:saved0": Action.SWAP}
    assert plan.fits and validate_plan(plan, trace, hw) == []
