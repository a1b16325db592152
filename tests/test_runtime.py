"""The plan runtime: every policy trains bit-identically, stays under its budget, survives divergence.

Acceptance is numerical identity (``torch.equal``) with the same steps run without the runtime.
"""

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import BranchyTiedLM, DataDependentLM
from tierflow.offload import (
    BudgetExceededError,
    HostTierConfig,
    NvmeTierConfig,
    OffloadConfig,
    OffloadRuntime,
    PlanningError,
    TiersConfig,
)
from tierflow.profiling import Category, LifetimeTracer, TracerConfig, memory_timeline
from tierflow.trainer.model import GPT, GPTConfig

VOCAB, SEQ, BATCH, STEPS = 64, 16, 16, 20
FAST_TRACER = TracerConfig(subtract_dispatch_cost=False)


def gpt() -> torch.nn.Module:
    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, d_model=32))


def branchy() -> torch.nn.Module:
    return BranchyTiedLM(VOCAB, hidden=32)


def batches(n: int, batch: int = BATCH):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (batch, SEQ), generator=gen) for _ in range(n)]


def train(make_model, data, runtime_config=None, tiers=None, grad_accum=1, movable=None):
    """Train on ``data``; with a config, under an OffloadRuntime. Returns losses, params, runtime,
    and the runtime's step reports."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rt = None
    if runtime_config is not None:
        rt = OffloadRuntime(model, opt, runtime_config, tiers=tiers, tracer_config=FAST_TRACER, movable=movable)
    losses, reports = [], []
    try:
        for x in data:
            with rt.step(x) if rt is not None else _nothing():
                total = 0.0
                for part in x.chunk(grad_accum):
                    loss = F.cross_entropy(model(part).flatten(0, 1), part.flatten())
                    (loss / grad_accum).backward()
                    total = total + loss.detach()
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(total)
            if rt is not None:
                reports.append(rt.last_report)
    finally:
        if rt is not None:
            rt.close()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], rt, reports


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def host_tiers() -> TiersConfig:
    return TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=64 << 20, slab_bytes=1 << 20))


def nvme_tiers(path) -> TiersConfig:
    return TiersConfig(nvme=NvmeTierConfig(enabled=True, dirs=[str(path)], budget_bytes=64 << 20,
                                           chunk_bytes=1 << 20, direct="off", preallocate=False))


def assert_identical(ref, got):
    assert torch.equal(ref[0], got[0]), (ref[0] - got[0]).abs().max()
    assert len(ref[1]) == len(got[1])
    for a, b in zip(ref[1], got[1]):
        assert torch.equal(a, b)


# Baselines only move their own categories, so they meet only the budgets those can reach.
BUDGETS = {"lifetime": 0.5, "ilp": 0.5, "belady": 0.5, "all_host": 0.6, "zero_offload": 0.9, "zero_infinity": 0.9}


@pytest.fixture(scope="module")
def references():
    data = batches(STEPS)
    return data, {"gpt": train(gpt, data), "branchy": train(branchy, data)}


@pytest.mark.parametrize("model", ["gpt", "branchy"])
@pytest.mark.parametrize("policy", sorted(BUDGETS))
def test_every_policy_is_bit_identical_and_moves_bytes(policy, model, references, tmp_path):
    data, refs = references
    tiers = nvme_tiers(tmp_path) if policy == "zero_infinity" else host_tiers()
    config = OffloadConfig(policy=policy, device_budget_fraction=BUDGETS[policy])
    got = train({"gpt": gpt, "branchy": branchy}[model], data, config, tiers)
    assert_identical(refs[model], got)
    rt = got[2]
    summary = rt.summary()
    assert summary["steps"].get("planned", 0) + summary["steps"].get("fallback", 0) == STEPS - 3
    assert sum(summary["bytes_out"].values()) > 0 and summary["plan_hits"] > 0
    # What left came back. A parameter read back keeps its tier copy while unchanged (Note [clean
    # copies]), so its next eviction writes nothing: reads may exceed writes.
    assert set(summary["bytes_in"]) == set(summary["bytes_out"])
    assert all(summary["bytes_in"][t] > 0 for t in summary["bytes_out"])
    assert summary["divergent_iterations"] == 0
    # Every planned offload found its tensor (Note [saved tensors held weakly], Note [late offload])
    # and the budget holds on every planned step.
    report = rt.last_report
    assert report.plan_missed == 0
    assert report.device_peak_bytes <= rt.plan.device_budget_bytes < rt.plan.unconstrained_peak_bytes
    assert summary["device_peak_bytes"] <= rt.plan.device_budget_bytes


def test_nvme_tier_lifetime_and_grad_accumulation(tmp_path):
    data = batches(8)
    ref = train(gpt, data, grad_accum=2)
    got = train(gpt, data, OffloadConfig(policy="lifetime", device_budget_fraction=0.5), nvme_tiers(tmp_path),
                grad_accum=2)
    assert_identical(ref, got)
    assert set(got[2].summary()["bytes_out"]) == {"nvme:0"}
    assert got[2].summary()["divergent_iterations"] == 0


def test_traced_device_peak_of_an_offloaded_iteration_stays_within_the_budget():
    """Note [storage swap]: the tracer sees every storage; what the runtime holds away is subtracted."""
    torch.manual_seed(0)
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches(4)
    rt = OffloadRuntime(model, opt, OffloadConfig(policy="lifetime", device_budget_fraction=0.5), tiers=host_tiers(),
                        tracer_config=FAST_TRACER)

    def step(x):
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with rt:
        for x in data[:3]:  # warm-up, then two profiled steps; the plan exists after these
            with rt.step(x):
                step(x)
        tracer = LifetimeTracer(model, opt, FAST_TRACER)
        with tracer:
            with tracer.iteration():
                tracer.mark_inputs(data[3])
                with rt.step(data[3]):
                    step(data[3])
        report, budget, trace = rt.last_report, rt.plan.device_budget_bytes, tracer.trace()
    assert report.mode == "planned"
    # Map every traced interval to the plan's interval it falls in. The runtime's own copies at the
    # backward-end callback show up to the tracer as one more (empty) graph task: extra points.
    planned = [p.label for p in rt.planning_trace.points]
    where, j = [], -1
    for p in trace.points:
        if j + 1 < len(planned) and p.label == planned[j + 1]:
            j += 1
        else:
            assert p.label.startswith(("backward_start backward", "backward_end backward")), p.label
        where.append(j)
    assert j == len(planned) - 1 and len(report.absent_by_interval) == len(planned)
    # A copy the training thread runs itself (Note [help while waiting]) works on a second storage
    # aliasing the tensor's memory (Note [alias, not share]); the tracer, seeing it first mid-iteration,
    # records it as external input. It is no new memory: leave those records out. (Nothing is away
    # when the tracer attaches here, the first planned step, so every real storage was registered.)
    real = tuple(r for r in trace.tensors if not (r.category is Category.INPUT and ":external" in r.key))
    traced = memory_timeline(replace(trace, tensors=real)).interval_peak_bytes
    measured = [peak - report.absent_by_interval[k] for peak, k in zip(traced, where)]
    # The runtime's own account (the planning trace's peak per interval minus what it held away)
    # and the tracer's measurement of the same iteration both meet the budget: no saved tensor
    # outlives its backward use (Note [alias, not share]: a transfer's closure never owns it).
    assert report.device_peak_bytes <= budget
    assert max(measured) <= budget < max(traced)  # without what was held away it would not fit


def test_changing_control_flow_trains_exactly_through_the_fallback():
    data = batches(STEPS)
    ref = train(lambda: DataDependentLM(VOCAB, reorder=True), data)
    config = OffloadConfig(policy="lifetime", device_budget_fraction=0.6, reprofile_after=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train(lambda: DataDependentLM(VOCAB, reorder=True), data, config, host_tiers())
    assert_identical(ref, got)
    summary = got[2].summary()
    assert summary["divergent_iterations"] >= 4 and summary["steps"]["fallback"] >= 4
    assert summary["reprofiles"] >= 1
    diverged = [w for w in caught if "diverged from the profiled trace" in str(w.message)]
    assert len(diverged) == 1  # warned once


def test_fallback_evicts_saved_activations_and_keeps_the_budget():
    """Traced without the extra block, run with it: only activations may move (as under DDP), so
    the fallback must evict saved activations, faulting each back in when touched, and results
    stay exact (Note [fault in])."""
    pool = batches(40)
    even = [b for b in pool if int(b.sum()) % 2 == 0]
    odd = [b for b in pool if int(b.sum()) % 2]
    data = even[:3] + odd[:2] + even[3:4] + odd[2:3]

    def make():
        return DataDependentLM(VOCAB, hidden=64)

    ref = train(make, data)
    config = OffloadConfig(policy="lifetime", device_budget_fraction=1.15, reprofile_after=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = train(make, data, config, host_tiers(), movable=frozenset({"activation"}))
    assert_identical(ref, got)
    budget = got[2].plan.device_budget_bytes
    modes = [r.mode for r in got[3]]
    assert modes == ["warmup", "profile", "profile", "fallback", "fallback", "planned", "fallback"]
    for r in got[3]:
        if r.mode == "fallback":
            evicted = dict(r.fallback_evicted)
            assert set(evicted) == {"activation"} and evicted["activation"] > 0
            # Room is made before anything comes back or an operation allocates (Note [headroom]),
            # so even the momentary peak stays within the budget.
            assert 0 < r.fallback_settled_peak_bytes <= r.device_peak_bytes <= budget
        elif r.mode == "planned":
            assert r.device_peak_bytes <= budget


def test_impossible_budget_fails_fast_naming_the_feasible_minimum():
    data = batches(6)
    torch.manual_seed(0)
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ran = []
    with OffloadRuntime(model, opt, OffloadConfig(policy="lifetime", device_budget_fraction=0.05), tiers=host_tiers(),
                        tracer_config=FAST_TRACER) as rt:
        with pytest.raises(PlanningError, match=r"below the feasible minimum \d+ bytes"):
            for x in data:
                with rt.step(x):
                    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
                    opt.step()
                    opt.zero_grad()
                ran.append(x)
    assert len(ran) == 2  # warm-up and the first profiled step; the second raised at its end


def test_baseline_that_cannot_meet_the_budget_is_refused():
    with pytest.raises(PlanningError, match=r"device budget \d+ bytes, the plan's peak \d+ bytes"):
        train(gpt, batches(4), OffloadConfig(policy="zero_offload", device_budget_fraction=0.5), host_tiers())


def test_divergent_iteration_over_budget_raises_naming_budget_and_need():
    torch.manual_seed(0)
    model = gpt()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    rt = OffloadRuntime(model, opt, OffloadConfig(policy="lifetime", device_budget_fraction=0.5), tiers=host_tiers(),
                        tracer_config=FAST_TRACER)
    with rt:
        for x in batches(3):
            with rt.step(x):
                F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
                opt.step()
                opt.zero_grad()
        big = batches(1, batch=BATCH * 16)[0]  # a new shape: diverges, and its activations cannot fit
        with pytest.raises(BudgetExceededError, match=r"device budget \d+ bytes exceeded.*needs at least \d+ bytes"):
            with rt.step(big):
                F.cross_entropy(model(big).flatten(0, 1), big.flatten()).backward()


def test_recompute_decisions_run_under_checkpointing_exactly(monkeypatch):
    """Force whole transformer blocks to recompute: the results must not change. (The planner's own
    recompute choices are tested in tests/faults/test_planner_recompute.py and test_accounting.py.)
    The budget is the whole peak, so the plan moves nothing else: a swap of an activation a forced
    re-run block makes again would be an invalid plan (Note [a re-run re-makes the whole block])."""
    import tierflow.offload.runtime._planning as runtime_module

    real = runtime_module.make_plan

    def with_recompute(trace, hardware, budgets, policy, **kwargs):
        from dataclasses import replace

        plan = real(trace, hardware, budgets, policy, **kwargs)
        return replace(plan, recomputed_blocks=("blocks.0[0]", "blocks.1[0]"))

    monkeypatch.setattr(runtime_module, "make_plan", with_recompute)
    data = batches(6)
    ref = train(gpt, data)
    got = train(gpt, data, OffloadConfig(policy="lifetime", device_budget_fraction=1.0), host_tiers())
    assert_identical(ref, got)
    assert got[2].plan.recomputed_blocks and got[2].summary()["divergent_iterations"] == 0


def test_config_rejects_bad_runtime_keys():
    with pytest.raises(ValueError, match="offload.profile_iterations=0 must be a whole number >= 1"):
        OffloadConfig(policy="lifetime", profile_iterations=0)


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["lifetime", "all_host", "belady"])
def test_cuda_exact_and_allocator_peak_within_budget(policy):
    device = torch.device("cuda")
    data = [x.to(device) for x in batches(10, batch=64)]

    def make():
        return gpt().to(device)

    ref = train(make, data)
    got = train(make, data, OffloadConfig(policy=policy, device_budget_fraction=BUDGETS[policy]), host_tiers())
    assert_identical(ref, got)
    rt = got[2]
    assert rt.last_report.mode == "planned"
    assert rt.last_report.device_peak_bytes <= rt.plan.device_budget_bytes * 1.05
    # Allocated and reserved peaks of every step, and the run's: the largest over every step.
    reports = got[3]
    assert all(r.device_reserved_peak_bytes >= r.device_peak_bytes > 0 for r in reports)
    summary = rt.summary()
    assert summary["device_peak_bytes"] == max(r.device_peak_bytes for r in reports)
    assert summary["device_reserved_peak_bytes"] == max(r.device_reserved_peak_bytes for r in reports)
    # Reserved within the documented margin of the budget (Note [reserved above the budget]).
    from tierflow.offload.runtime.report import RESERVED_MARGIN
    assert all(r.device_reserved_peak_bytes <= rt.plan.device_budget_bytes * RESERVED_MARGIN
               for r in reports if r.mode == "planned")


def test_budget_settings_that_do_nothing_warn():
    with pytest.warns(UserWarning, match="above the traced peak"):
        OffloadConfig(policy="lifetime", device_budget_fraction=1.5)
    # Bytes beside a preset's fraction is how a byte budget is given (every preset sets a
    # fraction): documented as winning, not warned about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = OffloadConfig(policy="lifetime", device_budget_fraction=0.5, device_budget_bytes=1 << 20)
    assert config.budgets().device_bytes == 1 << 20


def test_reserved_far_above_the_budget_is_reported_with_what_to_do():
    # Note [reserved above the budget] (the CUDA caching allocator's reserved bytes; on CPU it is 0).
    from tierflow.offload.runtime.report import RESERVED_MARGIN, warn_reserved_above

    budget = 1000
    assert not warn_reserved_above(3, 900, int(budget * RESERVED_MARGIN), budget)
    with pytest.warns(UserWarning, match=r"reserved 1200 bytes .*expandable_segments:True"):
        assert warn_reserved_above(3, 900, 1200, budget)


def test_a_step_leaves_no_autograd_graph_behind():
    # Note [hooks that keep a graph]: the per-call multi-grad hooks held their step's grad_fns in a
    # cycle Python's collector cannot see; every step's graph stayed alive (0.7 MiB a step). The
    # live autograd nodes after step 6 and after step 12 (6 steps later) must not grow.
    import gc

    def live_graph_nodes():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__.endswith("Backward0"))

    torch.manual_seed(0)
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = OffloadRuntime(model, opt, OffloadConfig(policy="lifetime", device_budget_fraction=0.5),
                        tiers=TiersConfig(host=HostTierConfig(enabled=True)), tracer_config=FAST_TRACER)
    counts = []
    with rt:
        for i, x in enumerate(batches(12)):
            with rt.step(x):
                F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if i in (5, 11):
                counts.append(live_graph_nodes())
    assert rt.summary()["steps"].get("planned", 0) >= 6
    # Relative: graphs other tests of the same process left behind are not this runtime's.
    assert counts[1] <= counts[0], counts  # was 133 -> 259: every step's graph stayed alive


@pytest.mark.parametrize("budget, cached", [(dict(device_budget_bytes=1 << 30), True),
                                            (dict(device_budget_fraction=0.5), False)])
def test_a_cpu_plan_that_moves_nothing_lets_glibc_keep_small_blocks(monkeypatch, budget, cached):
    # Note [a plan that moves nothing]: before the plan (and under any plan that moves or re-runs
    # something) every block of 1 MiB or more is mapped on its own so that RSS follows what is
    # live; a plan that moves nothing, far under its budget, lets glibc keep blocks under 8 MiB.
    import tierflow.offload.runtime.offload_runtime as runtime_module
    from tierflow.offload.runtime._planning import CACHED_BLOCK_BYTES, MAPPED_BLOCK_BYTES

    real, calls = runtime_module.map_large_allocations, []
    monkeypatch.setattr(runtime_module, "map_large_allocations",
                        lambda threshold=MAPPED_BLOCK_BYTES: calls.append(threshold) or real(threshold))
    data = batches(6)
    try:
        got = train(gpt, data, OffloadConfig(policy="lifetime", **budget), host_tiers())
    finally:
        real(MAPPED_BLOCK_BYTES)
    assert_identical(train(gpt, data), got)
    moved = any(d.action.value == "swap" for d in got[2].plan.decisions)
    assert moved is not cached
    assert calls == [MAPPED_BLOCK_BYTES, CACHED_BLOCK_BYTES if cached else MAPPED_BLOCK_BYTES]


def test_the_first_planned_step_evicts_before_it_brings_back(monkeypatch):
    # Note [evict before entering]: entering the plan from what the online policy left, the tensors
    # the plan keeps away at its start leave before the others come back; the other way round both
    # were resident for an instant (0.4 GB of RSS above a 2 GiB budget on a 12-layer FSDP2 GPT).
    import contextlib

    from tierflow.offload.runtime._exec import Executor
    from tierflow.offload.runtime._residency import Residency

    events, entering = [], [False]
    real_iteration, real_arrive, real_release = Executor.iteration, Residency.arrive, Residency.release

    @contextlib.contextmanager
    def iteration(self, inputs=None, first=False, saved_hooks=True):
        entering[0] = first and not self.online
        with real_iteration(self, inputs, first, saved_hooks):  # entering the plan happens on entry
            entering[0] = False
            yield

    def logged(kind, real):
        def wrapped(self, key, *args, **kwargs):
            if entering[0]:
                events.append(kind)
            return real(self, key, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(Executor, "iteration", iteration)
    monkeypatch.setattr(Residency, "arrive", logged("arrive", real_arrive))
    monkeypatch.setattr(Residency, "release", logged("release", real_release))
    data = batches(6)
    got = train(gpt, data, OffloadConfig(policy="lifetime", device_budget_fraction=0.4), host_tiers())
    assert_identical(train(gpt, data), got)
    assert got[2].summary()["steps"].get("planned", 0) >= 2
    assert "release" in events and "arrive" in events, events  # both happen entering the plan
    assert events.index("arrive") > len(events) - 1 - events[::-1].index("release"), events
