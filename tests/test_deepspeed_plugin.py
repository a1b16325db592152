"""tierflow attached to DeepSpeed (CPU accelerator, gloo): planned activation offload changes no bit."""

import json
import subprocess

import pytest
import torch

from tests.conftest import PYTHON, REPO
from tierflow.offload.core.errors import TierConfigError
from tierflow.offload.integrations.deepspeed import (
    client_optimizer_problems,
    parse_section,
    read_section,
    tiered_optimizer,
)
from tierflow.offload.optim.optimizer import TieredOptimizer
from tierflow.offload.runtime.config import OffloadConfig

SECTION = {"offload": {"policy": "lifetime", "device_budget_fraction": 0.75, "profile_warmup": 1,
                       "profile_iterations": 2},
           "tiers": {"host": {"enabled": True, "budget_bytes": 1 << 26, "slab_bytes": 1 << 20}}}


def test_section_parses_into_the_offload_and_tiers_schemas():
    offload, tiers = parse_section(SECTION)
    assert isinstance(offload, OffloadConfig) and offload.device_budget_fraction == 0.75
    assert tiers.host.enabled and tiers.host.budget_bytes == 1 << 26
    default_offload, default_tiers = parse_section(None)
    assert default_offload.policy == "lifetime" and default_tiers.host.enabled


@pytest.mark.parametrize("section, message", [
    ({"offlaod": {}}, r"unknown key\(s\) \['offlaod'\]"),
    ({"offload": {"policy": "fastest"}}, "policy='fastest' is not valid"),
    ({"tiers": {"host": {"budget": 1}}}, "tierflow.tiers: Key 'budget' not in 'HostTierConfig'"),
    ({"optimizer": {"subgroupbytes": 1}}, "tierflow.optimizer: Key 'subgroupbytes' not in 'TieredOptimizerConfig'"),
    ({"optimizer": {"paths": ["disk"]}}, r"tierflow.optimizer.paths=\['disk'\] must list one or more of"),
    ({"optimizer": {"num_buffers": 1}}, "tierflow.optimizer.num_buffers=1 must be >= 2"),
    ({"checkpoint": 5}, "tierflow.checkpoint must be a mapping"),
])
def test_bad_sections_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        parse_section(section)


def test_section_reads_the_optimizer_and_checkpoint_keys():
    parsed = read_section({**SECTION, "optimizer": {"subgroup_bytes": 4096}, "checkpoint": {"every_steps": 3}})
    assert parsed.optimizer.enabled and parsed.optimizer.subgroup_bytes == 4096
    assert parsed.optimizer.paths == ["host"]  # Note [optimizer paths default to the enabled tiers]
    assert parsed.checkpoint == {"every_steps": 3}
    nvme = read_section({"tiers": {"nvme": {"enabled": True, "dirs": ["/tmp"]}}})
    assert nvme.optimizer.paths == ["nvme"] and read_section(None).checkpoint is None


def _linear_and_grads():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    model(torch.randn(4, 16)).square().sum().backward()
    return model


@pytest.mark.parametrize("ds_config, message", [
    ({"zero_optimization": {"stage": 2}}, r"zero_optimization.stage=2 \(ZeRO replaces"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "zero_optimization.stage=3"),
    ({"bf16": {"enabled": True}}, "bf16.enabled=true"),
])
def test_tiered_client_optimizer_is_refused_where_deepspeed_rewrites_its_param_groups(ds_config, message):
    with pytest.raises(ValueError, match=message) as info:
        tiered_optimizer(_linear_and_grads(), {**ds_config, "tierflow": SECTION}, lr=1e-3)
    assert "offload_optimizer.device=cpu or nvme" in str(info.value)  # says what to use instead
    assert "ZeRO stage 0" in str(info.value)
    assert client_optimizer_problems({"zero_optimization": {"stage": 0}, "fp16": {"enabled": False}}) == []
    assert client_optimizer_problems({"zero_optimization": {"stage": "auto"}}) == []  # unknown: the hook checks


def test_step_hook_refuses_param_groups_a_wrapper_replaced_and_changes_nothing():
    model = _linear_and_grads()
    opt = tiered_optimizer(model, {"tierflow": {**SECTION, "optimizer": {"subgroup_bytes": 256}}}, lr=1e-2)
    try:
        assert isinstance(opt, TieredOptimizer) and opt.num_subgroups > 1
        before = [p.detach().clone() for p in model.parameters()]
        # What ZeRO 1/2 do to a client optimizer: each group's params become one flat fp32 partition.
        flat = torch.cat([p.detach().flatten() for p in model.parameters()]).requires_grad_()
        flat.grad = torch.ones_like(flat)
        saved = opt.param_groups[0]["params"]
        opt.param_groups[0]["params"] = [flat]
        with pytest.raises(ValueError, match="replaced its param groups .* refused before any parameter changed"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        opt.param_groups[0]["params"] = saved  # the groups it was built on: steps again
        opt.step()
        assert not torch.equal(before[0], model.weight)
    finally:
        opt.close()


def test_tiered_optimizer_section_switches_and_checks():
    model = _linear_and_grads()
    plain = tiered_optimizer(model, {"tierflow": {"optimizer": {"enabled": False}}, "zero_optimization": {"stage": 2}},
                             base=torch.optim.SGD, lr=0.1)
    assert type(plain) is torch.optim.SGD and plain.defaults["lr"] == 0.1  # disabled: the plain optimizer
    not_enabled = r"tierflow.optimizer.paths lists \['nvme'\].*tierflow.tiers.nvme.enabled"
    with pytest.raises(TierConfigError, match=not_enabled):
        tiered_optimizer(model, {"tierflow": {**SECTION, "optimizer": {"paths": ["nvme"]}}}, lr=1e-3)
    with pytest.warns(UserWarning, match="\"optimizer\" section is ignored by DeepSpeed"):
        opt = tiered_optimizer(model, {"tierflow": SECTION, "gradient_accumulation_steps": 4,
                                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, lr=1e-3)
    try:
        assert opt.config.backward_passes_per_step == 4  # from gradient_accumulation_steps
    finally:
        opt.close()


@pytest.mark.slow
def test_stage0_tiered_client_optimizer_equals_torch_adamw(subprocess_env, free_port, tmp_path, snapshot_store_dir):
    """The tiered AdamW (host tier, nvme tier, and host tier shared with attach()) as DeepSpeed's
    client optimizer at stage 0 trains bit-identically to torch AdamW; ZeRO-2 is refused; snapshots
    set up by the tierflow.checkpoint section restore it exactly."""
    pytest.importorskip("deepspeed", reason="deepspeed is installed by the dev extra; run ./launch/setup.sh test")
    swap = tmp_path / "swap"
    swap.mkdir(mode=0o700)
    section = {**SECTION, "offload": {**SECTION["offload"], "device_budget_fraction": 0.9},  # stage 0 keeps state
               "optimizer": {"subgroup_bytes": 16384},
               "checkpoint": {"every_steps": 1, "parity_shards": 0, "node_id": "n0",
                              "store_dir": str(snapshot_store_dir), "persist_on_finish": False}}
    env = {**subprocess_env, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "_deepspeed_job.py"), "10", "client", json.dumps(section),
                           str(swap)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    plain = results["adamw"]
    for case, path in (("tiered-host", "host"), ("tiered-nvme", "nvme"), ("tiered-host+attach", "host")):
        ours = results[case]
        assert ours["engine_optimizer"] == "TieredOptimizer", case  # stepped as given, not wrapped
        assert ours["losses"] == plain["losses"], f"{case}: losses differ"
        assert ours["digest"] == plain["digest"], f"{case}: parameters differ"
        assert ours["num_subgroups"] > 1 and ours["placement"] == {path: ours["num_subgroups"]}, case
    assert results["tiered-nvme"]["bytes_written"] > 0 and results["tiered-nvme"]["swap_files"] >= 1
    attached = results["tiered-host+attach"]
    assert attached["summary"]["shares_tiers"] and attached["summary"]["divergent_iterations"] == 0
    assert attached["modes"][3:] == ["planned"] * 7 and attached["bytes_moved"].get("host", 0) > 0
    refused = results["zero2-refused"]
    assert refused["engine_optimizer"] == "DeepSpeedZeroOptimizer"
    assert "ZeRO stage 2" in refused["attach_error"] and "offload_optimizer" in refused["attach_error"]
    assert "replaced its param groups" in refused["step_error"] and refused["unchanged"]
    snap = results["snapshots"]  # attach_snapshots(engine) with no settings: the section's
    assert snap["every_steps"] == 1 and snap["start"] == 5 and snap["restored"] == "memory", snap
    assert snap["got"] == snap["want"] and snap["got_digest"] == snap["want_digest"]


@pytest.mark.slow
def test_zero2_and_zero3_losses_and_parameters_equal_plain_deepspeed(subprocess_env, free_port):
    pytest.importorskip("deepspeed", reason="deepspeed is installed by the dev extra; run ./launch/setup.sh test")
    env = {**subprocess_env, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port), "PYTHONPATH": str(REPO)}
    # 0.8: gloo's hidden buffers of ZeRO's gathers and reduce-scatters are counted (Note [hidden
    # collective buffers]), which put the floor at 75.1% of the traced peak.
    section = {**SECTION, "offload": {**SECTION["offload"], "device_budget_fraction": 0.8}}
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "_deepspeed_job.py"), "10", "2,3", json.dumps(section)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    for stage in (2, 3):
        plain, ours = results[f"zero{stage}"], results[f"zero{stage}+tierflow"]
        assert ours["losses"] == plain["losses"], f"ZeRO-{stage}: losses differ"
        assert ours["digest"] == plain["digest"], f"ZeRO-{stage}: parameters differ"
        # Offloading really ran: the plan executed on the later steps and moved activations.
        assert ours["modes"][:3] == ["warmup", "profile", "profile"]
        # ZeRO-3 frees and re-gathers parameter buffers every step; the runtime tells a freed
        # buffer's recycled id from a live storage (StorageMap), so every later step follows the plan.
        assert ours["modes"][3:] == ["planned"] * (len(ours["modes"]) - 3), f"ZeRO-{stage}: {ours['modes']}"
        assert ours["summary"]["divergent_iterations"] == 0
        assert ours["bytes_moved"].get("host", 0) > 0
        assert ours["summary"]["device_peak_bytes"] <= ours["summary"]["device_budget_bytes"]
        assert all(peak <= ours["summary"]["device_budget_bytes"] for peak, _ in ours["peaks"][3:])
