"""The tiered optimizer: bit-identical to the plain optimizer on every tier, state_dict round trips,
swap files removed, and an atomic step under injected disk faults."""

import dataclasses
import os
import warnings

import pytest
import torch

from tests.helpers import disk_fills_at, fake_numa_sysfs
from tierflow.offload import (
    HostTierConfig,
    NumaTierConfig,
    NvmeTier,
    NvmeTierConfig,
    TierConfigError,
    TieredOptimizer,
    TieredOptimizerConfig,
    TieredStepError,
    TierEngine,
    TiersConfig,
)

KiB, MiB = 1 << 10, 1 << 20
STEPS = 20


class SignMomentum(torch.optim.Optimizer):
    """A user's own optimizer: momentum of the gradient sign, state created lazily with two tensors."""

    def __init__(self, params, lr=1e-2, beta=0.8):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["buf"] = torch.zeros_like(p)
                    state["seen"] = torch.zeros_like(p, dtype=torch.int32)
                    state["count"] = 0
                state["count"] += 1
                state["seen"].add_(1)
                state["buf"].mul_(group["beta"]).add_(p.grad.sign(), alpha=1 - group["beta"])
                p.add_(state["buf"] * state["seen"].float().rsqrt(), alpha=-group["lr"])


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(50, 24), torch.nn.Linear(24, 48), torch.nn.GELU(),
                               torch.nn.LayerNorm(48), torch.nn.Linear(48, 50))


def _groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "user": lambda ps: SignMomentum(ps, lr=1e-2),
}


def _tiers(tmp_path, kind, nvme_dirs=1):
    host = HostTierConfig(enabled=True, budget_bytes=4 * MiB, slab_bytes=MiB)
    if kind == "host":
        return TiersConfig(host=host)
    if kind == "numa":
        return TiersConfig(numa=NumaTierConfig(enabled=True, nodes=[0], budget_bytes=4 * MiB, slab_bytes=MiB))
    dirs = []
    for i in range(nvme_dirs):
        (tmp_path / f"ssd{i}").mkdir(exist_ok=True)
        dirs.append(str(tmp_path / f"ssd{i}"))
    return TiersConfig(nvme=NvmeTierConfig(enabled=True, dirs=dirs, chunk_bytes=16 * KiB, budget_bytes=16 * MiB),
                       numa=NumaTierConfig(enabled=True, nodes=[0], budget_bytes=4 * MiB, slab_bytes=MiB),
                       host=host if kind == "nvme+host" else HostTierConfig())


def _train(model, opt, steps=STEPS, sched=None):
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 50, (4, 6), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten())
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
    return torch.stack(losses) if losses else None


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def _same_state(sd_a, sd_b):
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for k, s in sd_a["state"].items():
        assert s.keys() == sd_b["state"][k].keys()
        for name, v in s.items():
            w = sd_b["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, name)
    return True


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numa binds to node 0 here; nvme may lack O_DIRECT
        yield


TIER_CASES = {"host-2k": ("host", 2 * KiB, False), "numa-6k": ("numa", 6 * KiB, False),
              "nvme+numa-3k": ("nvme", 3 * KiB, False), "host-3k-overlap": ("host", 3 * KiB, True),
              "nvme+numa-64k": ("nvme", 64 * KiB, False),
              # A window of staging buffers shared by sub-groups on host (no write-back) and nvme:
              # streamed in the first step, and in every step with overlap (Note [staging cache]).
              "nvme+host-3k": ("nvme+host", 3 * KiB, False), "nvme+host-3k-overlap": ("nvme+host", 3 * KiB, True)}
PATHS = {"nvme": ["nvme", "numa"], "nvme+host": ["nvme", "host"]}
MATRIX = [(case, name) for case in TIER_CASES for name in sorted(OPTIMIZERS)
          if case != "nvme+numa-64k" or name in ("adam", "adamw_fused", "user")]  # one sub-group: 3 suffice


@pytest.mark.parametrize("case,name", MATRIX, ids=[f"{c}-{n}" for c, n in MATRIX])
def test_twenty_steps_are_bit_identical_to_the_plain_optimizer(tmp_path, case, name):
    kind, subgroup_bytes, overlap = TIER_CASES[case]
    plain_model, tiered_model = _model(), _model()
    plain = OPTIMIZERS[name](_groups(plain_model))
    paths = PATHS.get(kind, [kind])
    cfg = TieredOptimizerConfig(paths=paths, subgroup_bytes=subgroup_bytes, overlap_backward=overlap)
    with TieredOptimizer(OPTIMIZERS[name](_groups(tiered_model)), config=cfg, tiers=_tiers(tmp_path, kind)) as opt:
        plain_sched = torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1.0 / (1 + s))
        tiered_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        assert torch.equal(_train(plain_model, plain, sched=plain_sched), _train(tiered_model, opt, sched=tiered_sched))
        assert _same(plain_model, tiered_model)
        assert _same_state(plain.state_dict(), opt.state_dict())
        assert not opt.inner.state  # between steps the state lives only in the tiers
        placed = opt.placement()
        assert set(placed) <= set(paths)
        assert opt.num_subgroups > 2 or subgroup_bytes > 16 * KiB
        if kind == "host" and not overlap:  # Note [in-place update]: no copies after the first step
            assert opt.counters["reads"] == 0 and opt.counters["in_place_updates"] >= (STEPS - 1) * opt.num_subgroups
            assert all(b.tensor is None for b in opt._pipe.buffers)  # staging buffers given back
        elif subgroup_bytes < 16 * KiB:
            assert opt.counters["reads"] > 0  # streamed, not all cached
        if overlap:
            assert opt.overlap_backward and opt.counters["redone_steps"] == 0
        if kind in PATHS and subgroup_bytes < 16 * KiB:
            assert set(placed) == set(paths)  # striped over both paths


def test_state_dict_round_trips_between_tiered_and_plain(tmp_path):
    model_a, model_b = _model(), _model()
    plain = torch.optim.AdamW(_groups(model_a), lr=1e-2)
    _train(model_a, plain, steps=3)
    model_b.load_state_dict(model_a.state_dict())
    cfg = TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=4 * KiB)
    with TieredOptimizer(torch.optim.AdamW(_groups(model_b), lr=1e-2), config=cfg,
                         tiers=_tiers(tmp_path, "nvme")) as opt:
        opt.load_state_dict(plain.state_dict())  # plain -> tiered
        _train(model_a, plain, steps=4)
        _train(model_b, opt, steps=4)
        assert _same(model_a, model_b)
        assert _same_state(plain.state_dict(), opt.state_dict())
        fresh = torch.optim.AdamW(_groups(model_b), lr=1e-2)
        fresh.load_state_dict(opt.state_dict())  # tiered -> plain
        _train(model_a, plain, steps=2)
        _train(model_b, fresh, steps=2)
        assert _same(model_a, model_b)


def test_wrapping_an_optimizer_that_already_has_state_moves_it_to_the_tiers(tmp_path):
    model_a, model_b = _model(), _model()
    a = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9)
    b = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9)
    _train(model_a, a, steps=2)
    _train(model_b, b, steps=2)
    with TieredOptimizer(b, config=TieredOptimizerConfig(paths=["host"], subgroup_bytes=4 * KiB),
                         tiers=_tiers(tmp_path, "host")) as opt:
        assert not b.state
        _train(model_a, a, steps=3)
        _train(model_b, opt, steps=3)
        assert _same(model_a, model_b)


def test_resident_state_stays_in_memory_and_stays_exact(tmp_path):
    model_a, model_b = _model(), _model()
    plain = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    cfg = TieredOptimizerConfig(paths=["host"], subgroup_bytes=4 * KiB, resident_bytes=12 * KiB)
    with TieredOptimizer(torch.optim.Adam(model_b.parameters(), lr=1e-2), config=cfg,
                         tiers=_tiers(tmp_path, "host")) as opt:
        _train(model_a, plain, steps=5)
        _train(model_b, opt, steps=5)
        assert _same(model_a, model_b)
        assert opt.placement().keys() == {"resident", "host"}


def test_swap_files_are_gone_after_close(tmp_path):
    model = _model()
    cfg = TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=4 * KiB)
    tiers = _tiers(tmp_path, "nvme", nvme_dirs=2)
    opt = TieredOptimizer(torch.optim.Adam(model.parameters()), config=cfg, tiers=tiers)
    _train(model, opt, steps=2)
    swap = [os.path.join(root, f) for d in tiers.nvme.dirs for root, _, files in os.walk(d) for f in files]
    assert len(swap) == 2  # one swap file per directory
    opt.close()
    assert not any(files for d in tiers.nvme.dirs for _, _, files in os.walk(d))
    with TierEngine(tiers) as engine:  # a shared engine stays open; the optimizer frees its slots
        with TieredOptimizer(torch.optim.Adam(model.parameters()), config=cfg, tiers=engine) as opt2:
            _train(model, opt2, steps=2)
            assert engine.nvme.num_slots > 0
        assert engine.nvme.num_slots == 0


@pytest.mark.parametrize("fail_in_step", [1, 3])
def test_disk_full_mid_step_keeps_the_previous_step(tmp_path, fail_in_step):
    (tmp_path / "ssd").mkdir()
    model_a, model_b = _model(), _model()
    plain = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    io = disk_fills_at(10 ** 9)
    cfg = NvmeTierConfig(enabled=True, dirs=[str(tmp_path / "ssd")], chunk_bytes=16 * KiB, preallocate=False,
                         budget_bytes=16 * MiB)
    tier = NvmeTier(cfg, raw_io=io)
    opt = TieredOptimizer(torch.optim.Adam(model_b.parameters(), lr=1e-2),
                          config=TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=3 * KiB), tiers={"nvme": tier})
    with tier, opt:
        _train(model_a, plain, steps=fail_in_step - 1)
        _train(model_b, opt, steps=fail_in_step - 1)
        before = [p.detach().clone() for p in model_b.parameters()]
        state_before = opt.state_dict() if fail_in_step > 1 else None
        io.fail_at = io.writes + 4  # the 4th write of the step fails, after some sub-groups updated
        with pytest.raises(TieredStepError, match=r"step \d+ failed: nvme tier: write of chunk .* No space left on device.*"
                                                  r"parameters and optimizer state are unchanged"):
            _train(model_b, opt, steps=1)
        assert all(torch.equal(p, q) for p, q in zip(model_b.parameters(), before))
        if state_before is not None:
            assert _same_state(state_before, opt.state_dict())
        else:
            assert opt.state_dict()["state"] == {}
        io.fail_at = 10 ** 9  # space freed: the same step succeeds and training continues exactly
        _train(model_a, plain, steps=3)
        _train(model_b, opt, steps=3)
        assert _same(model_a, model_b)
        assert _same_state(plain.state_dict(), opt.state_dict())


def test_a_full_budget_is_refused_without_changing_anything(tmp_path, monkeypatch):
    """Refused when the optimizer is built (the state is predicted on the meta device); and where
    it cannot be predicted (an optimizer that needs real values), at the first step, with the
    parameters unchanged."""
    from tierflow.offload import TierFullError
    from tierflow.offload.optim import optimizer as tiered

    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    (tmp_path / "ssd").mkdir()
    tiers = TiersConfig(nvme=NvmeTierConfig(enabled=True, dirs=[str(tmp_path / "ssd")], budget_bytes=64 * KiB,
                                            chunk_bytes=16 * KiB))
    config = TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=4 * KiB)
    with pytest.raises(TierFullError, match="does not fit optimizer.tiered.paths: sub-group .* finds no room"):
        TieredOptimizer(torch.optim.Adam(model.parameters()), tiers=tiers, config=config)
    monkeypatch.setattr(tiered, "predict_state_bytes", lambda *a: None)
    with TieredOptimizer(torch.optim.Adam(model.parameters()), tiers=tiers, config=config) as opt:
        with pytest.raises(TieredStepError, match="no path has room .* raise the tiers' budgets"):
            _train(model, opt, steps=1)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_config_and_wrapping_errors_say_what_to_do(tmp_path):
    from tierflow.offload import TierConfigError

    with pytest.raises(TierConfigError, match=r"paths=\['disk'\] must list one or more of"):
        TieredOptimizerConfig(paths=["disk"])
    with pytest.raises(TierConfigError, match="num_buffers=1 must be >= 2"):
        TieredOptimizerConfig(num_buffers=1)
    model = _model()
    with pytest.raises(TierConfigError, match=r"paths lists \['nvme'\], which are not enabled"):
        TieredOptimizer(torch.optim.Adam(model.parameters()), tiers=_tiers(tmp_path, "host"))
    with pytest.raises(TierConfigError, match="LBFGS cannot be tiered"):
        TieredOptimizer(torch.optim.LBFGS(model.parameters()), tiers=_tiers(tmp_path, "host"))
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer instance"):
        TieredOptimizer(torch.optim.Adam, tiers=_tiers(tmp_path, "host"))


def test_build_optimizer_wraps_when_tiered_is_enabled(tmp_path):
    from tierflow.trainer.config import ConfigError, OptimizerConfig
    from tierflow.trainer.optim import build_optimizer

    model_a, model_b = _model(), _model()
    plain, plain_sched = build_optimizer(model_a, OptimizerConfig(warmup_steps=2), total_steps=6)
    cfg = OptimizerConfig(warmup_steps=2, tiered=TieredOptimizerConfig(enabled=True, paths=["host"], subgroup_bytes=4 * KiB))
    with pytest.raises(ConfigError, match=r"needs tier\(s\) \['host'\] enabled .* tiers.host.enabled=true"):
        build_optimizer(model_b, cfg, total_steps=6)
    tiered, tiered_sched = build_optimizer(model_b, cfg, total_steps=6, tiers=_tiers(tmp_path, "host"))
    with tiered:
        assert isinstance(tiered, TieredOptimizer)
        assert torch.equal(_train(model_a, plain, steps=6, sched=plain_sched),
                           _train(model_b, tiered, steps=6, sched=tiered_sched))
        assert _same(model_a, model_b)


def test_deepspeed_cpu_adam_kernel_is_exact_against_plain_deepspeed_cpu_adam(tmp_path):
    from tierflow.offload.optim._kernel import choose_cpu_kernel, deepspeed_cpu_adam

    cls, why = deepspeed_cpu_adam()
    if cls is None:
        pytest.skip(f"DeepSpeedCPUAdam cannot load here: {why}")
    plain_model, a_model, b_model = _model(), _model(), _model()
    plain = cls(_groups(plain_model), lr=1e-2, adamw_mode=True)
    cfg = TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=3 * KiB)
    with TieredOptimizer(cls(_groups(a_model), lr=1e-2, adamw_mode=True), config=cfg,
                         tiers=_tiers(tmp_path, "nvme")) as wrapped, \
            TieredOptimizer(torch.optim.AdamW(_groups(b_model), lr=1e-2),
                            config=TieredOptimizerConfig(paths=["host"], subgroup_bytes=3 * KiB, cpu_kernel="deepspeed"),
                            tiers=_tiers(tmp_path, "host")) as converted:
        assert converted.cpu_kernel.name == "deepspeed" and type(converted.inner) is cls
        losses = [_train(m, o, steps=8) for m, o in ((plain_model, plain), (a_model, wrapped), (b_model, converted))]
        assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
        assert _same(plain_model, a_model) and _same(plain_model, b_model)
        assert _same_state(plain.state_dict(), wrapped.state_dict())
    opt, choice = choose_cpu_kernel(torch.optim.AdamW(_model().parameters(), fused=True), "auto", sample_numel=1 << 16)
    assert choice.torch_s > 0 and choice.deepspeed_s > 0 and choice.name in ("torch", "deepspeed")
    assert (type(opt) is cls) == (choice.name == "deepspeed")
    with pytest.raises(TierConfigError, match="cpu_kernel=deepspeed cannot be used: SGD is not"):
        choose_cpu_kernel(torch.optim.SGD(_model().parameters(), lr=0.1), "deepspeed")


def _fake_sysfs_with_this_process_on_node0(root):
    """Node 0 holds this process's CPUs, node 1 other CPUs, node 2 is memory-only (a CXL expander)."""
    mine = sorted(os.sched_getaffinity(0))
    return fake_numa_sysfs(root, {0: ",".join(map(str, mine)), 1: "1000-1001", 2: ""})


def _mapping_start(address):
    """Start of the mapping holding ``address`` (the kernel merges neighbours with the same policy)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return lo
    raise AssertionError(f"{address:#x} is not mapped")


def test_staging_buffers_and_resident_state_are_bound_to_the_local_node(tmp_path):
    from tierflow.offload.tiers.numa import numa_placement

    sysfs = _fake_sysfs_with_this_process_on_node0(tmp_path / "node")
    tiers = TiersConfig(numa=NumaTierConfig(enabled=True, nodes=[0], budget_bytes=4 * MiB, slab_bytes=MiB,
                                            sysfs_root=str(sysfs)))
    model_a, model_b = _model(), _model()
    plain = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    cfg = TieredOptimizerConfig(paths=["numa"], subgroup_bytes=4 * KiB, resident_bytes=12 * KiB)
    with TieredOptimizer(torch.optim.Adam(model_b.parameters(), lr=1e-2), config=cfg, tiers=tiers) as opt:
        _train(model_a, plain, steps=3)
        _train(model_b, opt, steps=3)
        assert _same(model_a, model_b)
        assert opt.local_nodes == (0,)
        resident = [r.memory.tensor for r in opt._pipe.records if r.path == "resident"]
        staging = [b.tensor for b in opt._pipe.buffers if b.tensor is not None]
        assert resident and staging
        for t in resident + staging:
            assert numa_placement(_mapping_start(t.data_ptr()))["policy"] == "bind:0"
    off = dataclasses.replace(cfg, local_numa="off")
    with TieredOptimizer(torch.optim.Adam(model_b.parameters()), config=off, tiers=tiers) as opt:
        assert opt.local_nodes == ()


@pytest.mark.cuda
@pytest.mark.parametrize("update_device", ["cpu", "device"])
def test_cuda_parameters_are_bit_identical_with_cpu_or_device_updates(tmp_path, update_device):
    """CPU update of CUDA parameters (state and update on the host) and device update of host-held
    state, each against the plain optimizer where that update runs, fed the same gradients."""
    from tierflow.offload.core.hardware import HardwareModel, LinkModel

    links = (LinkModel("host", "device", 25e9, 1e-5), LinkModel("device", "host", 25e9, 1e-5))
    hardware = HardwareModel(name="test", links=links)
    tiered_model = _model().cuda()
    ref_model = _model().cuda() if update_device == "device" else _model()
    ref = torch.optim.AdamW(_groups(ref_model), lr=1e-2, foreach=False)
    cfg = TieredOptimizerConfig(paths=["host"], subgroup_bytes=3 * KiB, update_device=update_device,
                                device_budget_bytes=1 << 30)
    with TieredOptimizer(torch.optim.AdamW(_groups(tiered_model), lr=1e-2, foreach=False), config=cfg,
                         tiers=_tiers(tmp_path, "host"), hardware=hardware) as opt:
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p, q in zip(tiered_model.parameters(), ref_model.parameters()):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.cuda(), g.to(q.device)
            opt.step()
            ref.step()
        torch.cuda.synchronize()
        assert all(torch.equal(p.cpu(), q.cpu()) for p, q in zip(tiered_model.parameters(), ref_model.parameters()))
        assert set(opt.update_placement().where) == {update_device}
        assert all(p.is_cuda for p in tiered_model.parameters())


def test_dcp_get_optimizer_state_dict_reads_the_state_without_stepping_it(tmp_path):
    """Note [state that is not here]: DCP's get_optimizer_state_dict (how torchtitan saves) takes a
    zero-gradient step when ``optimizer.state`` looks empty. The tiered optimizer's state lives in
    its tiers, so it must still say it has some: the saved state equals the plain optimizer's, and
    training on from it stays bit-identical."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    plain_model, tiered_model = _model(), _model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    cfg = TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=3 * KiB)
    with TieredOptimizer(torch.optim.AdamW(tiered_model.parameters(), lr=1e-2), config=cfg,
                         tiers=_tiers(tmp_path, "nvme")) as opt:
        assert not opt.state  # no state before the first step: DCP may create it
        _train(plain_model, plain, steps=3)
        _train(tiered_model, opt, steps=3)
        assert opt.state and not len(opt.state)  # state exists, in the tiers, not in this dict
        plain_model.zero_grad(set_to_none=True)
        tiered_model.zero_grad(set_to_none=True)  # no gradients: DCP's zero-gradient step would run
        saved_plain = get_optimizer_state_dict(plain_model, plain)
        saved_tiered = get_optimizer_state_dict(tiered_model, opt)
        assert saved_plain["state"].keys() == saved_tiered["state"].keys()
        for name, s in saved_plain["state"].items():
            for k, v in s.items():
                assert torch.equal(v, saved_tiered["state"][name][k]), (name, k)
        assert torch.equal(_train(plain_model, plain, steps=2), _train(tiered_model, opt, steps=2))
        assert _same(plain_model, tiered_model)


def test_dcp_set_optimizer_state_dict_loads_into_the_tiers_and_trains_on_exactly(tmp_path):
    """The other half of DCP's API (torchtitan's load): set_optimizer_state_dict on a fresh tiered
    optimizer first takes its own zero-learning-rate step to create state, then loads; the state
    must end up in the tiers as saved, and training on equals the plain optimizer's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    plain_model = _model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    _train(plain_model, plain, steps=3)
    plain_model.zero_grad(set_to_none=True)
    saved = get_optimizer_state_dict(plain_model, plain)
    tiered_model = _model()
    tiered_model.load_state_dict(plain_model.state_dict())
    cfg = TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=3 * KiB)
    with TieredOptimizer(torch.optim.AdamW(tiered_model.parameters(), lr=1e-2), config=cfg,
                         tiers=_tiers(tmp_path, "nvme")) as opt:
        set_optimizer_state_dict(tiered_model, opt, saved)
        assert opt.state and not len(opt.state) and _same(plain_model, tiered_model)
        assert torch.equal(_train(plain_model, plain, steps=2), _train(tiered_model, opt, steps=2))
        assert _same(plain_model, tiered_model)
