"""Recompute as the planner itself chooses it, run end to end (issue 15, item 17).

Note [recompute regions] (in ``tierflow.offload.plan.context``) says which block may re-create an
activation and which blocks may be re-run together; the hand-built traces below check it per
policy. The end-to-end test gives the planner a link so slow that every round trip costs more than
re-running a block, so under a tight budget it picks recompute on its own (nothing patched). The
run must then equal training without offloading bit for bit, re-run the chosen blocks once per
planned step, follow the plan without falling back, and stay inside the budget; with parameters
and optimizer states movable too, what a re-run block reads must be back where it re-runs
(Note [recompute reads parameters early] in ``tierflow.offload.plan._reruns``).
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_plan_fixtures import hardware, make_trace, tensor
from tierflow.offload import HostTierConfig, OffloadConfig, OffloadRuntime, TiersConfig
from tierflow.offload.core.hardware import HardwareModel, LinkModel, TierModel
from tierflow.offload.plan import Action, Budgets, make_plan, validate_plan
from tierflow.profiling import TracerConfig
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


def _rerun_trace(late_bytes: int, late_interval: int):
    """Block ``b`` reads parameter ``b.w`` and saves ``b[0]:saved0``, which backward reads at point
    4: re-run, ``b`` reads ``b.w`` there, though the trace next uses it at the optimizer step (7).
    Temporary ``T`` makes intervals 2 and 3 need both gone; ``U`` (``late_bytes`` in
    ``late_interval`` and the next) needs ``b.w`` gone there too."""
    kinds = [(FP, "b", 0), (FQ, "b", 0), (PointKind.BACKWARD_START, "backward", 0), (BP, "b", 0),
             (PointKind.GRAD_READY, "b.w", 0), (PointKind.BACKWARD_END, "backward", 0),
             (PointKind.OPTIMIZER_PRE, "SGD", 0), (PointKind.OPTIMIZER_POST, "SGD", 0)]
    u = late_interval
    return make_trace([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], [
        tensor("Y", 1000, range(10), category=Category.INPUT),
        tensor("b.w", 100, (1, 7), category=Category.PARAM),
        tensor("b[0]:saved0", 1000, (1, 4), created=1, freed=4),
        tensor("T", 1100, (2, 3), created=2, freed=3, category=Category.TEMPORARY),
        tensor("U", late_bytes, (u, u + 1), created=u, freed=u + 1, category=Category.TEMPORARY),
    ], kinds)


@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_a_re_run_block_reads_its_parameters_where_it_re_runs(policy):
    # Note [recompute reads parameters early]: b.w left at 2 and, planned from the trace alone,
    # stayed away until 7, across b's re-run at 4. Now it is back at 4 and leaves again after it.
    trace, hw = _rerun_trace(1100, 5), hardware(bandwidth=200.0)
    plan = make_plan(trace, hw, Budgets(device_bytes=2100), policy)
    assert plan.recomputed_blocks == ("b[0]",)
    assert [(d.key, d.action, d.evict_point, d.deadline_point) for d in plan.decisions] == [
        ("b.w", Action.SWAP, 2, 4), ("b[0]:saved0", Action.RECOMPUTE, 2, 4), ("b.w", Action.SWAP, 5, 7)]
    assert plan.fits and validate_plan(plan, trace, hw) == []
    # The validator sees the re-run as a use: a plan holding b.w away across it is refused.
    away = replace(plan.decisions[0], free_point=2, prefetch_point=7, deadline_point=7)
    stale = replace(plan, decisions=(away, plan.decisions[1]))
    assert any("b.w" in p and "used at point 4 before arrival" in p for p in validate_plan(stale, trace, hw))


@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_swaps_alone_when_a_re_run_block_cannot_read_its_parameters(policy):
    # Interval 4 (the re-run) has room for b.w only if it is away: re-running b cannot fit.
    trace, hw = _rerun_trace(50, 4), hardware(bandwidth=200.0)
    plan = make_plan(trace, hw, Budgets(device_bytes=2100), policy)
    assert plan.recomputed_blocks == ()
    assert {d.key: d.action for d in plan.decisions} == {"b.w": Action.SWAP, "b[0]:saved0": Action.SWAP}
    assert plan.fits and validate_plan(plan, trace, hw) == []


# ---- end to end --------------------------------------------------------------------------------


class Expert(nn.Module):
    """A wide GELU MLP: the 1 MiB activations it saves are made inside it and cheap to re-make."""

    def __init__(self, d: int, wide: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, wide)
        self.down = nn.Linear(wide, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Saves a tensor of its own after its expert returns: a block that may not be re-run together
    with its expert (Note [recompute regions])."""

    def __init__(self, d: int, wide: int) -> None:
        super().__init__()
        self.expert = Expert(d, wide)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.expert(x))


class Net(nn.Module):
    def __init__(self, d: int = 16, wide: int = 1024, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, wide) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def slow_host() -> HardwareModel:
    """100 kB/s each way: a 1 MiB round trip takes 21 s, re-running an expert milliseconds, and no
    swap of an activation hides behind compute."""
    tiers = (TierModel("device", "device", 1 << 40), TierModel("host", "host", 1 << 40))
    links = (LinkModel("device", "host", 1e5, 0.0), LinkModel("host", "device", 1e5, 0.0))
    return HardwareModel(name="slow-host", tiers=tiers, links=links)


STEPS = 7  # warm-up, two profiled steps, four planned ones
# Activations and gradients move; parameters and optimizer states stay (the tests of Note
# [recompute reads parameters early] below move them too).
MOVABLE = frozenset({"activation", "grad"})


def train(data, policy=None, fraction=None, movable=MOVABLE):
    """Losses, final parameters, forward calls per module per step, and the runtime (None without);
    ``movable`` None: the runtime's default (every category it can move)."""
    torch.manual_seed(0)
    model = Net()
    calls = {}
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rt = None
    if policy is not None:
        rt = OffloadRuntime(model, opt, OffloadConfig(policy=policy, device_budget_fraction=fraction),
                            tiers=TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=64 << 20,
                                                                  slab_bytes=1 << 20)),
                            hardware=slow_host(), tracer_config=TracerConfig(subtract_dispatch_cost=False),
                            movable=movable)
    losses, per_step, reports = [], [], []
    try:
        for x in data:
            calls.clear()
            with rt.step(x) if rt is not None else torch.enable_grad():
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            per_step.append(dict(calls))
            if rt is not None:
                reports.append(rt.last_report)
    finally:
        if rt is not None:
            rt.close()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], per_step, rt, reports


@pytest.fixture(scope="module")
def reference():
    gen = torch.Generator().manual_seed(7)
    data = [torch.randn(256, 16, generator=gen) for _ in range(STEPS)]
    return data, train(data)


@pytest.mark.parametrize("fraction", [0.8, 0.6])
@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_planner_chosen_recompute_trains_exactly_within_the_budget(policy, fraction, reference):
    data, ref = reference
    losses, params, calls, rt, reports = train(data, policy, fraction)
    plan = rt.plan
    # The planner's own choice: experts (their activations are made inside them), never an
    # expert's Linear (it saves its input, which re-running it cannot free) and never a block
    # together with its expert.
    recomputed = [d for d in plan.decisions if d.action is Action.RECOMPUTE]
    assert recomputed and plan.recomputed_blocks
    assert {d.recompute_block for d in recomputed} == set(plan.recomputed_blocks)
    assert all(b.endswith(".expert[0]") or b[:-3] in ("blocks.0", "blocks.1", "blocks.2")
               for b in plan.recomputed_blocks), plan.recomputed_blocks
    paths = [b[:-3] for b in plan.recomputed_blocks]
    assert not [(a, b) for a in paths for b in paths if b.startswith(a + ".")], paths
    # Bit-identical to training without offloading.
    assert torch.equal(ref[0], losses), (ref[0] - losses).abs().max()
    assert len(ref[1]) == len(params) and all(torch.equal(a, b) for a, b in zip(ref[1], params))
    # Every planned step re-ran each chosen block (and what it calls) once in backward; every
    # other module ran once, as without offloading.
    assert [r.mode for r in reports] == ["warmup", "profile", "profile"] + ["planned"] * (STEPS - 3)
    rerun = {name for name in ref[2][0] if any(name == p or name.startswith(p + ".") for p in paths)}
    for step in range(3, STEPS):
        assert calls[step] == {name: 2 if name in rerun else 1 for name in ref[2][step]}, calls[step]
    # The plan was followed: no divergence, no fallback, no planned tensor missed; the budget held.
    summary = rt.summary()
    assert summary["divergent_iterations"] == 0 and summary["reprofiles"] == 0
    assert summary["steps"] == {"warmup": 1, "profile": 2, "planned": STEPS - 3}
    for r in reports[3:]:
        assert r.plan_missed == 0 and r.fallbacks == 0 and r.divergence == ""
        assert r.device_peak_bytes <= plan.device_budget_bytes < plan.unconstrained_peak_bytes
    assert summary["peak_by_mode"]["planned"] <= plan.device_budget_bytes


@pytest.mark.parametrize("fraction", [0.4, 0.42])
@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_recompute_reads_parameters_where_the_block_re_runs(policy, fraction, reference):
    # Note [recompute reads parameters early]: with parameters and optimizer states movable too,
    # plans kept an expert's parameters away until their traced use, after the point where the
    # expert re-runs; the runtime fetched them on demand there and went over the budget (at 0.42:
    # 3,728,468 bytes against 3,676,735 for lifetime, 3,744,852 for ilp). Plans now keep what a
    # re-run block reads on the device from its re-run point.
    data, ref = reference
    losses, params, _, rt, reports = train(data, policy, fraction, movable=None)
    plan = rt.plan
    assert plan.recomputed_blocks and all(b.endswith(".expert[0]") for b in plan.recomputed_blocks)
    assert {d.category for d in plan.decisions} >= {"param", "optimizer_state"}
    assert torch.equal(ref[0], losses), (ref[0] - losses).abs().max()
    assert len(ref[1]) == len(params) and all(torch.equal(a, b) for a, b in zip(ref[1], params))
    summary = rt.summary()
    assert summary["divergent_iterations"] == 0 and summary["reprofiles"] == 0
    assert summary["steps"] == {"warmup": 1, "profile": 2, "planned": STEPS - 3}
    for step, r in enumerate(reports[3:], start=3):
        assert r.plan_missed == 0 and r.divergence == ""
        assert r.device_peak_bytes <= plan.device_budget_bytes < plan.unconstrained_peak_bytes, (
            step, r.device_peak_bytes, plan.device_budget_bytes)
        # No on-demand fetch: every read of a re-run block is back where it re-runs. (The first
        # planned step starts by bringing back what the online policy of the profiled steps left
        # away, which counts as fetched on demand.)
        assert step == 3 or r.fallbacks == 0, (step, r.fallbacks)
        assert r.fallback_evicted == ()
    assert summary["peak_by_mode"]["planned"] <= plan.device_budget_bytes
