"""Stepping the optimizer one sub-group at a time: the same bits, and a budget floor far below the state."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from tierflow.offload import HostTierConfig, OffloadConfig, OffloadRuntime, SubgroupStepper, TiersConfig
from tierflow.offload.plan import Budgets
from tierflow.offload.plan.context import build_context, feasible_minimum_bytes
from tierflow.offload.runtime._schedule import one_iteration
from tierflow.profiling import TraceWindow
from tierflow.trainer.model import GPT, GPTConfig

OPTIMIZERS = {
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam-loop": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False, weight_decay=0.1),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
}


def _gpt(n_layer=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=n_layer, n_head=2, d_model=32))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(n)]


def _train(make_opt, subgroup_bytes=None, steps=5, clip=1.0, free_grads=False):
    model = _gpt()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = make_opt([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    step = SubgroupStepper(opt, subgroup_bytes, free_grads=free_grads) if subgroup_bytes is not None else opt.step
    losses = []
    for b in _batches(steps):
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses, model, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("subgroup_bytes", [0, 4096, 1 << 30])
def test_stepping_by_sub_group_is_bit_identical(name, subgroup_bytes):
    ref_losses, ref_model, ref_opt = _train(OPTIMIZERS[name])
    losses, model, opt = _train(OPTIMIZERS[name], subgroup_bytes, free_grads=subgroup_bytes == 0)
    assert losses == ref_losses
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    sa, sb = ref_opt.state_dict(), opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # the real groups are back after every step
    for k in sa["state"]:
        for s in sa["state"][k]:
            assert torch.equal(torch.as_tensor(sa["state"][k][s]), torch.as_tensor(sb["state"][k][s])), (k, s)


def test_sub_groups_follow_the_size_and_unsupported_uses_are_refused():
    model = _gpt()
    opt = torch.optim.AdamW(model.parameters())
    per_param = SubgroupStepper(opt, 0)
    per_param._partition()
    assert len(per_param.subgroups) == len(list(model.parameters()))
    whole = SubgroupStepper(opt, 1 << 40)
    whole._partition()
    assert len(whole.subgroups) == 1
    with pytest.raises(ValueError, match="LBFGS"):
        SubgroupStepper(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match=">= 0"):
        SubgroupStepper(opt, -1)
    with pytest.raises(ValueError, match="closure"):
        per_param(closure=lambda: 0.0)


def _floor(subgroup_bytes):
    model = _gpt(n_layer=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = SubgroupStepper(opt, subgroup_bytes, free_grads=True) if subgroup_bytes is not None else opt.step
    window = TraceWindow(model, opt, num_iterations=1, first_step=1)
    for i, b in enumerate(_batches(2)):
        with window.step(i, b):
            F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).backward()
            step()
            opt.zero_grad(set_to_none=True)
    ctx = build_context(one_iteration(window.trace, -1), None, Budgets())
    return feasible_minimum_bytes(ctx)[0] / int(ctx.interval_peak.max())


def test_the_budget_floor_drops_from_the_whole_state_to_a_sub_group():
    """One optimizer call keeps every parameter, gradient and state in use at once; one call per
    parameter lets each wait elsewhere during the others' updates."""
    whole, split = _floor(None), _floor(0)
    assert whole > 0.5 and split < 0.6 * whole, (whole, split)


def test_the_runtime_plans_below_the_old_floor_and_stays_exact():
    def run(config=None):
        model = _gpt(n_layer=4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = SubgroupStepper(opt, 0, free_grads=True)
        rt = OffloadRuntime(model, opt, config, tiers=TiersConfig(host=HostTierConfig(enabled=True))) \
            if config else None
        losses, reports = [], []
        for b in _batches(7):
            with rt.step(b) if rt else torch.enable_grad():
                loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            reports.append(rt.last_report if rt else None)
        if rt:
            rt.close()
        return losses, model, reports, rt

    ref_losses, ref_model, _, _ = run()
    floor_without = _floor(None)
    budget = 0.3
    assert budget < floor_without
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses, model, reports, rt = run(OffloadConfig(policy="lifetime", device_budget_fraction=budget))
    assert losses == ref_losses
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    planned = [r for r in reports if r.mode == "planned"]
    assert len(planned) == 4 and all(r.plan_missed == 0 for r in planned)
    assert all(r.device_peak_bytes <= rt.plan.device_budget_bytes for r in planned)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping that scales, and one that does not
def test_clipping_streamed_by_sub_group_matches_clip_grad_norm(max_norm):
    def run(streamed):
        model = _gpt()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
        stepper = SubgroupStepper(opt, 2048, free_grads=True)
        norms = []
        for b in _batches(4):
            F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).backward()
            if streamed:
                norms.append(stepper.clip_and_step(model.parameters(), max_norm))
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                opt.step()
            opt.zero_grad(set_to_none=True)
        return norms, model

    ref_norms, ref = run(False)
    norms, got = run(True)
    assert all(torch.equal(a, b) for a, b in zip(ref_norms, norms))
    for (n, a), (_, b) in zip(ref.named_parameters(), got.named_parameters()):
        assert torch.equal(a, b), n


def test_free_grads_drops_each_gradient_after_its_update():
    model = _gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = _batches(1)[0]
    F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).backward()
    SubgroupStepper(opt, 0, free_grads=True)()
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).backward()
    SubgroupStepper(opt, 0)()
    assert all(p.grad is not None for p in model.parameters())


def _train_fused(make_opt, subgroup_bytes, steps=5):
    """``_train`` without clipping, every sub-group updated inside backward."""
    model = _gpt()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = make_opt([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    stepper = SubgroupStepper(opt, subgroup_bytes, free_grads=True)
    losses = []
    for b in _batches(steps):
        with stepper.fused_into_backward():
            loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
            loss.backward()
        assert all(p.grad is None for p in model.parameters())  # freed as each sub-group was updated
        sched.step()
        losses.append(loss.item())
    return losses, model, opt


@pytest.mark.parametrize("name", ["adamw-foreach", "sgd-nesterov", "rmsprop"])
@pytest.mark.parametrize("subgroup_bytes", [0, 4096])
def test_an_update_fused_into_backward_is_bit_identical(name, subgroup_bytes):
    """Note [update in backward]: sub-groups stepped as their gradients become final (in reverse
    order, inside backward) give the bits of one step after backward."""
    ref_losses, ref_model, ref_opt = _train(OPTIMIZERS[name], clip=float("inf"))
    losses, model, opt = _train_fused(OPTIMIZERS[name], subgroup_bytes)
    assert losses == ref_losses
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    assert ref_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_norms_taken_in_backward_clip_exactly(max_norm):
    """The norms clip_and_step needs, taken as each gradient became final in backward, give the
    bits of clip_grad_norm_ (scaling and not), and no pass over the gradients runs before the
    update (no step over empty groups)."""
    ref_losses, ref_model, _ = _train(OPTIMIZERS["adamw-foreach"], clip=max_norm)
    model = _gpt()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = OPTIMIZERS["adamw-foreach"]([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    stepper = SubgroupStepper(opt, 0, free_grads=True)
    empty_steps = []
    opt.register_step_pre_hook(lambda o, *_: empty_steps.append(not o.param_groups))
    losses = []
    for b in _batches(5):
        with stepper.norms_in_backward():
            loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
            loss.backward()
        stepper.clip_and_step(model.parameters(), max_norm)
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    assert losses == ref_losses
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    assert empty_steps and not any(empty_steps)
