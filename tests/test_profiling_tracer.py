"""The tracer on real training: byte counts worked out by hand from the architecture, the peak against
an independent count, stability, numerical identity and a complete detach."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tierflow.profiling import (
    Category,
    LifetimeTracer,
    PointKind,
    check_stability,
    memory_timeline,
    torch_compat,
    trace_iterations,
    validate_trace,
)
from tierflow.trainer.model import GPT, GPTConfig

F32 = 4  # bytes per float32 element
I64 = 8


class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, d_out=8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _mlp_run(batch=4, seed=0):
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = [(torch.randn(batch, 16), torch.randn(batch, 8)) for _ in range(4)]

    def step(i, tracer=None):
        x, y = data[i]
        if tracer is not None:
            tracer.mark_inputs(x, y)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(3)  # warm-up: Adam creates its state lazily in the first step
    return model, opt, step


def _trace(model, opt, step, iterations):
    tracer = LifetimeTracer(model, opt)
    with tracer:
        for i in range(iterations):
            with tracer.iteration():
                step(i, tracer)
    return tracer.trace()


def _point_of(trace, kind, iteration=0):
    return next(i for i, p in enumerate(trace.points) if p.kind is kind and p.iteration == iteration)


def _activation_bytes(trace, iteration):
    return sum(r.size_bytes for r in trace.tensors if r.category is Category.ACTIVATION and r.iteration == iteration)


def test_mlp_bytes_per_category_match_the_architecture():
    model, opt, step = _mlp_run(batch=4)
    trace = _trace(model, opt, step, 1)
    assert validate_trace(trace) == []
    tl = memory_timeline(trace)
    b = 4
    params = F32 * (16 * 32 + 32 + 32 * 8 + 8)  # 3232
    adam = 2 * params + 4 * F32  # exp_avg + exp_avg_sq per parameter, plus a float32 `step` per tensor
    pre = _point_of(trace, PointKind.OPTIMIZER_PRE)
    assert tl.bytes_at(pre, Category.PARAM) == params
    assert tl.bytes_at(pre, Category.GRAD) == params
    assert tl.bytes_at(pre, Category.OPTIMIZER_STATE) == adam
    assert tl.bytes_at(pre, Category.INPUT) == F32 * b * (16 + 8)  # x and the target
    assert tl.bytes_at(_point_of(trace, PointKind.ITERATION_END), Category.GRAD) == 0  # zero_grad(set_to_none)
    # Autograd saves: ReLU its output [b, 32] (fc2 saves the same storage as its input); mse_loss its
    # input, fc2's output [b, 8]. fc1 saves x (an input) and the weights (parameters).
    acts = {r.key: r.size_bytes for r in trace.tensors if r.category is Category.ACTIVATION}
    assert acts == {"act[0]:saved0": F32 * b * 32, "<outside>[0]:saved0": F32 * b * 8}
    keys = {r.key: r.category for r in trace.tensors}
    for name, _ in model.named_parameters():
        assert keys[name] is Category.PARAM
        assert keys[f"{name}:grad"] is Category.GRAD
        assert keys[f"{name}:exp_avg"] is keys[f"{name}:exp_avg_sq"] is keys[f"{name}:step"] is Category.OPTIMIZER_STATE


def _gpt_run(seed=0, n_layer=2, batch=4, seq_len=16, vocab=64, d_model=32, n_head=2, grad_accum=1):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, seq_len=seq_len, n_layer=n_layer, n_head=n_head, d_model=d_model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    # Windows of seq_len + 1 tokens, split like tierflow.trainer.data does: inputs and targets view one storage.
    windows = [torch.randint(vocab, (batch, seq_len + 1), generator=gen) for _ in range(8)]

    def step(i, tracer=None):
        w = windows[i]
        if tracer is not None:
            tracer.mark_inputs(w)
        for _ in range(grad_accum):
            logits = model(w[:, :-1])
            (F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten()) / grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(7)
    return model, opt, step


def test_gpt_bytes_per_category_match_the_architecture():
    L, B, T, V, C, H, r = 2, 4, 16, 64, 32, 2, 4
    model, opt, step = _gpt_run(n_layer=L, batch=B, seq_len=T, vocab=V, d_model=C, n_head=H)
    trace = _trace(model, opt, step, 1)
    assert validate_trace(trace) == []
    # Parameters: token + position embeddings; per block two LayerNorms (weight, bias), qkv (3C x C),
    # proj (C x C), up (rC x C), down (C x rC); a final LayerNorm; the head is tied to tok_emb.
    n_tensors = 2 + 8 * L + 2
    params = F32 * (V * C + T * C + L * (4 * C + 3 * C * C + C * C + 2 * r * C * C) + 2 * C)
    pre = _point_of(trace, PointKind.OPTIMIZER_PRE)
    tl = memory_timeline(trace)
    assert tl.bytes_at(pre, Category.PARAM) == params
    assert tl.bytes_at(pre, Category.GRAD) == params
    assert tl.bytes_at(pre, Category.OPTIMIZER_STATE) == 2 * params + F32 * n_tensors
    assert tl.bytes_at(pre, Category.INPUT) == I64 * B * (T + 1)  # one window storage, inputs and targets
    # What autograd saves for backward, per block (BTC = one [B, T, C] float32 tensor):
    #   ln1: its input, mean and rstd [B, T, 1]   qkv: ln1's output   attention (CPU flash kernel):
    #   q, k, v (views of qkv's [B, T, 3C] output), its output, logsumexp [B, H, T]   proj: its input,
    #   a view of the attention output (the kernel lays it out as [B, T, H, C/H], so the reshape
    #   copies nothing)   ln2: input, mean, rstd   up: ln2's output   GELU: its input [B, T, rC]
    #   down: GELU's output [B, T, rC]
    btc, bt = B * T * C, B * T
    per_block = F32 * (8 * btc + 2 * r * btc + 4 * bt + B * H * T)
    # Outside the blocks: the position ids (int64), ln_f (input, mean, rstd) and the head's input;
    # the loss saves log_softmax's output [BT, V], the flattened targets (a copy: the target view is
    # not contiguous) and nll_loss's total_weight (a float32 scalar).
    outer = I64 * T + F32 * (2 * btc + 2 * bt + bt * V) + I64 * bt + F32
    assert _activation_bytes(trace, 0) == L * per_block + outer
    assert sum(r.category is Category.ACTIVATION for r in trace.tensors) == 13 * L + 8
    # When backward starts every saved activation is alive, and the peak follows right after: the first
    # gradients are made before the loss's saved tensors are released.
    start = _point_of(trace, PointKind.BACKWARD_START)
    assert tl.bytes_at(start, Category.ACTIVATION) == L * per_block + outer
    assert tl.peak.point == start


def _independent_peak(model, opt, step, i):
    """Peak of one iteration counted by PyTorch's private memory tracker (not used by our tracer)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        step(i)
    snap = mt.get_tracker_snapshot("peak")
    return snap[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("which", ["mlp", "gpt"])
def test_peak_agrees_with_an_independent_count(which):
    model, opt, step = _mlp_run() if which == "mlp" else _gpt_run(batch=8)

    def fresh_step(i, tracer=None):
        # Inputs made inside the iteration, so both counters see them born.
        if which == "mlp":
            x, y = torch.randn(4, 16) + 0, torch.randn(4, 8) + 0
            F.mse_loss(model(x), y).backward()
        else:
            w = torch.randint(64, (8, 17)) + 0
            F.cross_entropy(model(w[:, :-1]).float().flatten(0, 1), w[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    ours = memory_timeline(_trace(model, opt, fresh_step, 1)).peak.total_bytes
    torch.manual_seed(1)
    theirs = _independent_peak(model, opt, fresh_step, 0)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def test_keys_repeat_over_three_iterations_of_a_static_model():
    model, opt, step = _gpt_run(grad_accum=2)
    trace = _trace(model, opt, step, 3)
    assert validate_trace(trace) == []
    per_iter = [sorted((r.key, r.category, r.size_bytes) for r in trace.tensors if r.iteration == i) for i in range(3)]
    assert per_iter[0] == per_iter[1] == per_iter[2]
    assert len(per_iter[0]) > 100
    labels = [[p.label for p in trace.points if p.iteration == i] for i in range(3)]
    assert labels[0] == labels[1] == labels[2]
    assert sum(p.kind is PointKind.BACKWARD_START for p in trace.points) == 3 * 2  # two micro-batches each
    st = check_stability(trace)
    assert st.static, st.describe()


class _Alternating(torch.optim.SGD):
    """An optimizer like the tiered one: it holds a buffer outside ``state`` (made before tracing),
    replaces a kept counter per group of parameters every step, and walks those groups in the
    other order every other step, making scratch of a different size for each."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.buffer = torch.zeros(64)
        self.counters = [torch.zeros(()) for _ in self.param_groups[0]["params"]]
        self.steps = 0

    def step(self, closure=None):
        order = list(range(len(self.counters)))
        for i in order if self.steps % 2 == 0 else order[::-1]:
            scratch = torch.ones(3 + i) * self.counters[i]  # dropped at once
            self.counters[i] = self.counters[i] + scratch.sum() * 0  # kept until the next step
            self.buffer.add_(1.0)
        self.steps += 1
        return super().step(closure)


def test_what_the_optimizer_holds_and_the_order_of_its_scratch_are_not_another_graph():
    """Note [what the optimizer holds] and Note [temporaries of the step]: the first traced step
    reads the optimizer's own buffer and last step's counters for the first time, and every other
    step makes its scratch in the other order; the iterations still repeat."""
    torch.manual_seed(0)
    model = MLP()
    opt = _Alternating(model.parameters())

    def step(i, tracer=None):
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    trace = _trace(model, opt, step, 3)
    assert validate_trace(trace) == []
    st = check_stability(trace)
    assert st.static, st.describe()
    held = [r for r in trace.tensors if r.key.startswith("held")]
    assert {r.size_bytes for r in held} == {64 * F32, F32} and all(r.created is None for r in held)
    # The step's scratch is keyed by size, so a key names one size in every iteration.
    step_keys = {}
    for r in trace.tensors:
        if r.category is Category.TEMPORARY and ":tmp" in r.key and r.key.startswith("optimizer_pre"):
            step_keys.setdefault(r.key, set()).add(r.size_bytes)
    assert step_keys and all(len(sizes) == 1 for sizes in step_keys.values()), step_keys


class Branchy(nn.Module):
    """a, then b or c: which one is decided from outside, like data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.use_c = False

    def forward(self, x):
        return (self.c if self.use_c else self.b)(torch.relu(self.a(x)))


def _branchy_trace(change):
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = {0: 4, 1: 4, 2: 4}

    def step(i, tracer=None):
        model.use_c = change == "branch" and i == 2
        x = torch.randn(rows[i] if change != "shape" or i < 2 else 6, 8)
        if tracer is not None:
            tracer.mark_inputs(x)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    return _trace(model, opt, step, 3)


def test_changed_control_flow_is_reported_at_the_right_point():
    trace = _branchy_trace("branch")
    st = check_stability(trace)
    assert not st.static
    d = st.divergence
    # Iteration points: 0 iteration_start, 1 forward_pre <model>, 2 forward_pre a, 3 forward_post a,
    # 4 forward_pre b (forward_pre c in iteration 2).
    start2 = _point_of(trace, PointKind.ITERATION_START, iteration=2)
    assert (d.iteration, d.offset, d.point, d.key) == (2, 4, start2 + 4, None)
    assert trace.points[d.point].label == "forward_pre c[0]"
    assert "forward_pre b[0]" in d.reason


def test_changed_shapes_are_reported_at_the_input_that_changed():
    trace = _branchy_trace("shape")
    d = check_stability(trace).divergence
    # The input is made by the step itself, in the iteration's first interval (offset 0).
    assert (d.iteration, d.offset, d.key) == (2, 0, "input0")
    assert "size_bytes 192 (iteration 0: 128)" in d.reason


def _hook_state(model, opt):
    return ([(len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
             for m in model.modules()],
            [(len(p._post_accumulate_grad_hooks or {}), len(p._backward_hooks or {})) for p in model.parameters()],
            (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)))


def test_detach_leaves_nothing_behind():
    model, opt, step = _gpt_run()
    before = _hook_state(model, opt)
    tracer = LifetimeTracer(model, opt)
    with tracer:
        assert torch_compat.dispatch_mode_stack() and torch_compat.outer_saved_tensors_hooks() is not None
        with tracer.iteration():
            step(0, tracer)
    assert _hook_state(model, opt) == before
    assert torch_compat.dispatch_mode_stack() == []
    assert torch_compat.outer_saved_tensors_hooks() is None
    state = [t for s in opt.state.values() for t in s.values()]
    for t in [*model.parameters(), *state]:
        assert weakref.getweakrefcount(t.untyped_storage()) == 0  # no free callbacks of ours
    n_points = len(tracer.trace().points)
    step(1)  # training on records nothing
    assert len(tracer.trace().points) == n_points
    ref = weakref.ref(tracer)
    del tracer
    gc.collect()
    assert ref() is None  # nothing (hook, callback, mode) still holds the tracer


def test_an_exception_inside_an_iteration_still_detaches():
    model, opt, step = _mlp_run()
    before = _hook_state(model, opt)
    with pytest.raises(RuntimeError, match="boom"):
        with LifetimeTracer(model, opt) as tracer:
            with tracer.iteration():
                model(torch.randn(2, 16)).sum().backward()
                raise RuntimeError("boom")
    assert _hook_state(model, opt) == before and torch_compat.dispatch_mode_stack() == []


def test_tracing_changes_no_result():
    runs = []
    for traced in (False, True):
        model, opt, step = _gpt_run(seed=3)
        if traced:
            trace_iterations(model, opt, step, num_iterations=3)
        else:
            for i in range(3):
                step(i)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_misuse_is_reported_clearly():
    model, opt, _ = _mlp_run()
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        LifetimeTracer(object(), opt)
    with pytest.raises(ValueError, match="optimizer must be"):
        LifetimeTracer(model, "adam")
    tracer = LifetimeTracer(model, opt)
    with pytest.raises(RuntimeError, match="attach the tracer"):
        with tracer.iteration():
            pass
    with pytest.raises(ValueError, match="no iteration was traced"):
        tracer.trace()
    with pytest.raises(ValueError, match="num_iterations=0"):
        trace_iterations(model, opt, lambda i: None, num_iterations=0)


@pytest.mark.cuda
def test_cuda_peak_agrees_with_the_allocator():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = GPT(GPTConfig(vocab_size=1024, seq_len=256, n_layer=4, n_head=8, d_model=512)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i, tracer=None):
        w = torch.randint(1024, (8, 257), device=dev)
        F.cross_entropy(model(w[:, :-1]).float().flatten(0, 1), w[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated()
    trace = _trace(model, opt, step, 1)
    torch.cuda.synchronize()
    tl = memory_timeline(trace)
    # Memory allocated before tracing that no traced tensor owns (cuBLAS workspaces) is still counted by
    # the allocator's high-water mark; add it to ours.
    untracked = allocated_before - tl.bytes_at(0)
    assert untracked >= 0
    ours, allocator = tl.peak.total_bytes + untracked, torch.cuda.max_memory_allocated()
    assert abs(ours - allocator) <= 0.05 * allocator, (ours, allocator)
    assert all(p.compute_s >= 0 for p in trace.points) and trace.device.startswith("cuda")
