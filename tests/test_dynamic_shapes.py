"""Models whose tensor sizes change every step still run on a plan (issue 16, shape-tolerant plans).

Note [size reservations] (``tierflow.profiling.shapes``): a key whose size varied among the
profiled iterations, or whose family did, is planned at its largest size times ``1 +
offload.shape_headroom``; a smaller tensor follows the plan and is accounted at its real size,
a larger one uses what the plan left under the budget or, past that, leaves the plan for the
rest of its step, after which the runtime plans again for the size it saw (no new profile).
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.faults.test_planner_recompute import Expert
from tests.helpers import DataDependentLM
from tests.test_plan_fixtures import make_trace, tensor
from tierflow.offload import HostTierConfig, OffloadConfig, OffloadRuntime, TiersConfig
from tierflow.profiling import Category, LifetimeTracer, TracerConfig, memory_timeline
from tierflow.profiling.shapes import (
                                       family_of,
                                       merge_sizes,
                                       observed_sizes,
                                       plan_reservations,
                                       reserve_sizes,
                                       reserved_sizes,
)
from tierflow.trainer.model import GPT, GPTConfig

FAST_TRACER = TracerConfig(subtract_dispatch_cost=False)
VOCAB = 50


# ---- the reservations, on hand-built sizes ------------------------------------------------------


def test_a_family_varies_together_and_each_member_keeps_its_own_largest_size():
    sizes = {"moe.experts.0[0]:saved0": (800, 1000), "moe.experts.1[0]:saved0": (640, 640),
             "moe.experts.1[0]:saved1": (64, 64), "head[0]:saved0": (4096, 4096)}
    got = reserved_sizes(sizes, 0.25)
    # experts.1's saved0 did not vary in the profile, but its sibling did: it is reserved too,
    # at its own size (siblings may differ in width), never at the family's largest.
    assert got == {"moe.experts.0[0]:saved0": 1250, "moe.experts.1[0]:saved0": 800}


def test_static_sizes_reserve_nothing_and_the_trace_is_unchanged():
    assert reserved_sizes({"a[0]:saved0": (10, 10), "b.w": (4, 4)}, 0.5) == {}


def test_family_of_replaces_every_list_index_in_the_module_path_only():
    assert family_of("layers.3.mlp.experts.12[1]:saved4") == "layers.#.mlp.experts.#[1]:saved4"
    assert family_of("h.0.attn.c_attn.weight:exp_avg_sq") == "h.#.attn.c_attn.weight:exp_avg_sq"
    assert family_of("forward_pre blocks.2[0]:tmp7") == "forward_pre blocks.#[0]:tmp7"
    assert family_of("input0") == "input0"


def test_temporaries_are_reserved_only_inside_modules_whose_saved_tensors_vary():
    # A temporary's key is the n-th allocation after a point: under ZeRO-3 that may be another
    # tensor each iteration, so its size "varies" without meaning (head's here); inside an expert
    # whose activations vary it follows them.
    temp = Category.TEMPORARY
    trace = make_trace([0, 1, 1, 0], [
        tensor("m.e.0[0]:saved0", 100, (1, 2), created=1, freed=2),
        tensor("forward_post m.e.0[0]:tmp0", 50, (1,), created=1, freed=1, category=temp),
        tensor("forward_post head[0]:tmp0", 50, (2,), created=2, freed=2, category=temp)])
    sizes = {"m.e.0[0]:saved0": (80, 100), "forward_post m.e.0[0]:tmp0": (40, 50), "forward_post head[0]:tmp0": (10, 50)}
    assert plan_reservations(trace, sizes, 0.25) == {"m.e.0[0]:saved0": 125, "forward_post m.e.0[0]:tmp0": 63}
    static = {**sizes, "m.e.0[0]:saved0": (100, 100)}
    assert plan_reservations(trace, static, 0.25) == {}  # no saved tensor varies: nothing is reserved


def test_headroom_must_be_a_fraction():
    with pytest.raises(ValueError, match="headroom"):
        reserved_sizes({"a": (1, 2)}, -0.1)
    with pytest.raises(ValueError, match="offload.shape_headroom"):
        OffloadConfig(policy="lifetime", shape_headroom=-1)


def test_sizes_merge_across_profiles_and_reservations_never_shrink_a_record():
    merged = merge_sizes({"a": (4, 8)}, {"a": (2, 6), "b": (1, 1)})
    assert merged == {"a": (2, 8), "b": (1, 1)}
    model = nn.Linear(4, 4)
    tracer = LifetimeTracer(model, None, FAST_TRACER)
    with tracer:
        for n in (3, 5):
            with tracer.iteration():
                x = torch.randn(n, 4)
                tracer.mark_inputs(x)
                model(x).square().sum().backward()
    trace = tracer.trace()
    sizes = observed_sizes(trace)
    varying = {k for k, (lo, hi) in sizes.items() if lo != hi}
    assert varying and all(sizes[k][1] > sizes[k][0] for k in varying)
    reserved = reserved_sizes(sizes, 0.25)
    resized = reserve_sizes(trace, reserved)
    for old, new in zip(trace.tensors, resized.tensors):
        assert new.size_bytes == (max(old.size_bytes, reserved[old.key]) if old.key in reserved else old.size_bytes)


# ---- end to end ---------------------------------------------------------------------------------


class LoopMoE(nn.Module):
    """Top-2 of 4 experts, run one by one on the tokens routed to each (the eager way: every
    expert's activations are as large as its share of the batch, which changes every step)."""

    def __init__(self, d: int, wide: int, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(d, num_experts)
        self.experts = nn.ModuleList(Expert(d, wide) for _ in range(num_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.router(x).softmax(-1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return out


class MoELM(nn.Module):
    def __init__(self, d: int = 64, wide: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(LoopMoE(d, wide) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).flatten(0, 1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def tokens(lengths, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, n), generator=g) for n in lengths]


def host() -> TiersConfig:
    return TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=256 << 20, slab_bytes=1 << 20))


def traced_peak(make_model, x) -> int:
    """The unconstrained device peak of one steady training step (after one that makes the states)."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt, x)
    tracer = LifetimeTracer(model, opt, FAST_TRACER)
    with tracer:
        with tracer.iteration():
            tracer.mark_inputs(x)
            step(model, opt, x)
    return memory_timeline(tracer.trace()).peak.total_bytes


def step(model, opt, x):
    loss = F.cross_entropy(model(x).reshape(-1, VOCAB), x.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def train(make_model, data, config=None):
    """Losses, parameters, step reports and the runtime (None without one)."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = OffloadRuntime(model, opt, config, tiers=host(), tracer_config=FAST_TRACER) if config else None
    losses, reports = [], []
    try:
        for x in data:
            with rt.step(x) if rt is not None else torch.enable_grad():
                losses.append(step(model, opt, x))
            if rt is not None:
                reports.append(rt.last_report)
    finally:
        if rt is not None:
            rt.close()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], reports, rt


def assert_identical(ref, got):
    assert torch.equal(ref[0], got[0])
    assert all(torch.equal(a, b) for a, b in zip(ref[1], got[1]))


def assert_within_budget(reports, budget):
    over = [(r.step, r.mode, r.device_peak_bytes) for r in reports if r.device_peak_bytes > budget]
    assert not over, f"steps over the budget of {budget} bytes: {over}"


@pytest.mark.parametrize("policy", ["lifetime", "ilp"])
def test_moe_with_per_expert_loops_runs_on_the_plan_within_budget(policy):
    data = tokens([64] * 12)
    budget = int(0.8 * traced_peak(MoELM, data[0]))
    ref = train(MoELM, data)
    got = train(MoELM, data, OffloadConfig(policy=policy, device_budget_bytes=budget))
    assert_identical(ref, got)
    reports, rt = got[2], got[3]
    after = [r.mode for r in reports if r.mode not in ("warmup", "profile")]
    assert len(after) == 9, [r.mode for r in reports]  # the plan exists after one warm-up and two profiled steps
    assert after.count("planned") >= 0.8 * len(after), after
    assert_within_budget(reports, budget)
    summary = rt.summary()
    assert summary["steps"] == {m: sum(r.mode == m for r in reports) for m in {r.mode for r in reports}}
    assert summary["reserved_keys"] > 0 and summary["reprofiles"] == 0
    assert sum(r.plan_hits for r in reports if r.mode == "planned") > 0  # the plan moved tensors


def gpt() -> nn.Module:
    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=32, n_layer=2, n_head=2, d_model=32))


def test_a_tensor_larger_than_its_reservation_makes_the_runtime_plan_again_not_profile():
    # No headroom and two profiled lengths of 24 and 20 tokens: the first batch of 32 is larger
    # than anything reserved. That step falls back; the next are planned for it, no new profile.
    data = tokens([24, 20, 24, 32, 32, 20, 32])
    budget = int(0.6 * traced_peak(gpt, data[3]))
    ref = train(gpt, data)
    got = train(gpt, data, OffloadConfig(policy="lifetime", device_budget_bytes=budget, shape_headroom=0.0))
    assert_identical(ref, got)
    modes = [r.mode for r in got[2]]
    assert modes == ["warmup", "profile", "profile", "fallback"] + ["planned"] * 3, modes
    assert got[3].summary()["replans"] == 1 and got[3].summary()["reprofiles"] == 0
    assert_within_budget(got[2], budget)


def test_two_sequence_lengths_alternating_stay_on_the_plan():
    data = tokens([32, 24] * 5)
    budget = int(0.6 * traced_peak(gpt, data[0]))
    ref = train(gpt, data)
    got = train(gpt, data, OffloadConfig(policy="lifetime", device_budget_bytes=budget))
    assert_identical(ref, got)
    modes = [r.mode for r in got[2]]
    assert modes[3:] == ["planned"] * 7, modes
    assert got[3].summary()["divergent_iterations"] == 0
    assert_within_budget(got[2], budget)


def test_re_profiling_backs_off_when_the_model_is_simply_dynamic():
    # Control flow that changes with the batch: every step may leave the plan. Re-profiling after
    # each divergence would profile again and again; the threshold doubles after each re-profile.
    data = tokens([16] * 24, batch=8, seed=3)
    config = OffloadConfig(policy="lifetime", device_budget_fraction=0.7, reprofile_after=1)
    ref = train(lambda: DataDependentLM(VOCAB, reorder=True), data)
    with pytest.warns(UserWarning, match="diverged"):
        got = train(lambda: DataDependentLM(VOCAB, reorder=True), data, config)
    assert_identical(ref, got)
    modes = [r.mode for r in got[2]]
    # Divergent steps between re-profiles: 1, then 2, then 4, ... (a profile is 2 steps).
    runs, count = [], 0
    for prev, mode in zip(modes, modes[1:]):
        if mode == "fallback":
            count += 1
        elif mode == "profile" and prev == "fallback":
            runs.append(count)
            count = 0
    assert len(runs) >= 2 and runs == [2 ** i for i in range(len(runs))], modes


def test_a_planned_step_of_varying_size_is_never_accounted_below_what_the_tracer_measures():
    # The runtime's own account of a planned step (the reserved trace's peak per interval, minus
    # what was held away and what smaller saved tensors left unused) never reads below what the
    # tracer measured of the same step, and stays within the budget. It reads above by what
    # temporaries (activation gradients, say) left of their reservation: the runtime never sees
    # those (1.6% at this step's peak interval when written).
    data = tokens([64] * 5)
    budget = int(0.8 * traced_peak(MoELM, data[0]))
    torch.manual_seed(0)
    model = MoELM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = OffloadRuntime(model, opt, OffloadConfig(policy="lifetime", device_budget_bytes=budget), tiers=host(),
                        tracer_config=FAST_TRACER)
    with rt:
        for x in data[:3]:
            with rt.step(x):
                step(model, opt, x)
        tracer = LifetimeTracer(model, opt, FAST_TRACER)
        with tracer:
            with tracer.iteration():
                tracer.mark_inputs(data[3])
                with rt.step(data[3]):
                    step(model, opt, data[3])
        report, trace = rt.last_report, tracer.trace()
        planned = [p.label for p in rt.planning_trace.points]
    assert report.mode == "planned"
    where, j = [], -1
    for p in trace.points:  # each traced interval -> the plan's interval it falls in
        if j + 1 < len(planned) and p.label == planned[j + 1]:
            j += 1
        where.append(j)
    assert j == len(planned) - 1
    # What this second tracer cannot place: storages it first saw without seeing them made (before
    # the iteration, or in backward where autograd allocates some in C++: Note [allocations no
    # operation shows]); neither can the runtime.
    real = tuple(r for r in trace.tensors if not ((r.category is Category.INPUT and ":external" in r.key)
                                                  or ":unseen" in r.key))
    traced = memory_timeline(replace(trace, tensors=real)).interval_peak_bytes
    measured = [0] * len(planned)
    for peak, k in zip(traced, where):
        measured[k] = max(measured[k], peak - report.absent_by_interval[k])
    accounted = report.resident_by_interval
    assert all(a >= m for a, m in zip(accounted, measured)), [(i, a, m) for i, (a, m) in
                                                              enumerate(zip(accounted, measured)) if a < m][:5]
    assert max(measured) <= report.device_peak_bytes <= budget


# ---- the online policy asks an operation's output size before it runs ---------------------------


def test_an_operations_output_is_sized_before_it_runs_without_drawing_random_numbers():
    # Note [room before the operation] in tierflow.offload.runtime._fallback.
    from tierflow.offload.runtime._fallback import _output_bytes

    aten = torch.ops.aten
    a, b = torch.randn(64, 32), torch.randn(32, 128)
    assert _output_bytes(aten.mm.default, (a, b), {}) == 64 * 128 * 4
    assert _output_bytes(aten.add_.Tensor, (a, a), {}) == 0  # in place: no new storage
    mask = torch.rand(64, 32) > 0.5
    assert _output_bytes(aten.nonzero.default, (mask,), {}) == 0  # data-dependent: cannot tell
    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert _output_bytes(aten.bernoulli.p, (a, 0.5), {}) == a.nbytes
    assert torch.equal(torch.get_rng_state(), before)  # the real dropout mask stays the same


# ---- recompute keeps the keys of everything after it ---------------------------------------------


def test_a_re_run_block_does_not_renumber_the_tensors_of_later_blocks(monkeypatch):
    # Note [inputs of a re-run block]: Llama's rotary cos/sin are made once and saved first by
    # layer 0's attention; checkpointed, layer 0 saves nothing the runtime sees, and layer 1 used to
    # give them a number the trace never had: every planned step left the plan.
    transformers = pytest.importorskip("transformers")
    import tierflow.offload.runtime._planning as planning

    real = planning.make_plan
    monkeypatch.setattr(planning, "make_plan", lambda *a, **k: replace(
        real(*a, **k), recomputed_blocks=("model.layers.0.self_attn[0]",)))

    def llama():
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, use_cache=False)
        return transformers.LlamaForCausalLM(cfg)

    def lm_step(model, opt, x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def run(config):
        torch.manual_seed(0)
        model = llama()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rt = OffloadRuntime(model, opt, config, tiers=host(), tracer_config=FAST_TRACER) if config else None
        losses, modes = [], []
        for x in tokens([32] * 6, batch=2):
            with rt.step(x) if rt is not None else torch.enable_grad():
                losses.append(lm_step(model, opt, x))
            modes.append(rt.last_report.mode if rt is not None else None)
        if rt is not None:
            assert rt.plan.recomputed_blocks == ("model.layers.0.self_attn[0]",)
            rt.close()
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()], modes

    ref, got = run(None), run(OffloadConfig(policy="lifetime", device_budget_fraction=0.9))
    assert_identical(ref, got)
    assert got[2][3:] == ["planned"] * 3, got[2]


# ---- module calls a step does not make ----------------------------------------------------------


class HashMoE(nn.Module):
    """Hash routing (Hash Layers, Roller et al. 2021): a token's id picks its expert, and an expert
    no token of the batch hashes to is not called at all."""

    def __init__(self, d: int = 32, wide: int = 128, num_experts: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.experts = nn.ModuleList(Expert(d, wide) for _ in range(num_experts))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).flatten(0, 1)
        route = tokens.flatten() % len(self.experts)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = torch.where(route == e)[0]
            if idx.numel():
                out = out.index_add(0, idx, expert(x[idx]))
        return self.head(x + out)


def test_an_expert_no_token_reaches_is_passed_over_and_the_step_stays_on_the_plan():
    # Note [module calls not made]: the profiled steps call every expert; later batches leave out
    # the tokens of one expert or two (their calls, forward and backward, never happen). Every
    # such step used to diverge and run on the fallback.
    g = torch.Generator().manual_seed(3)

    def batch(missing=()):  # about 128 tokens per expert called, whichever are left out
        allowed = torch.tensor([t for t in range(VOCAB) if t % 4 not in missing])
        return allowed[torch.randint(0, len(allowed), (2 * (4 - len(missing)), 64), generator=g)]

    data = [batch() for _ in range(3)] + [batch(m) for m in [(1,), (), (2, 3), (0,), (3,), (1, 2)]]
    assert all(len({int(t) % 4 for t in x.flatten()}) == 4 for x in data[:3])
    budget = int(0.8 * max(traced_peak(HashMoE, x) for x in data[:3]))
    ref = train(HashMoE, data)
    got = train(HashMoE, data, OffloadConfig(policy="lifetime", device_budget_bytes=budget))
    assert_identical(ref, got)
    reports, rt = got[2], got[3]
    assert [r.mode for r in reports] == ["warmup", "profile", "profile"] + ["planned"] * 6
    assert all(r.plan_missed == 0 for r in reports[3:]) and rt.summary()["divergent_iterations"] == 0
    assert sum(r.plan_hits for r in reports[3:]) > 0
    assert_within_budget(reports, budget)
