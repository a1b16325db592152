"""tierflow attached to DeepSpeed (CPU accelerator, gloo): planned activation offload changes no bit."""

import json
import subprocess

import pytest

from offload.deepspeed_plugin import parse_section
from offload.plan_config import OffloadConfig
from tests.conftest import PYTHON, REPO

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
])
def test_bad_sections_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        parse_section(section)


@pytest.mark.slow
def test_zero2_and_zero3_losses_and_parameters_equal_plain_deepspeed(subprocess_env, free_port):
    pytest.importorskip("deepspeed", reason="deepspeed is installed by the dev extra; run ./launch/setup.sh test")
    env = {**subprocess_env, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "_deepspeed_job.py"), "10", "2,3", json.dumps(SECTION)],
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
