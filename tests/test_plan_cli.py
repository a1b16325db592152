"""``tierflow plan`` end to end on a saved hand-built trace."""

import os
import stat

import pytest

from tests.test_plan import _mixed_trace
from tierflow.offload.plan import Budgets
from tierflow.offload.plan.types import OffloadPlan, validate_plan
from tierflow.profiling import load_trace, save_trace
from tierflow.trainer.cli import main as cli_main
from tierflow.trainer.commands.plan import parse_budget


@pytest.fixture
def trace_file(tmp_path):
    return str(save_trace(_mixed_trace(), tmp_path / "trace.tftrace"))


def test_plan_writes_table_json_and_png(trace_file, tmp_path, capsys):
    rc = cli_main(["plan", trace_file, "tiers=h100_sxm_pcie5_2nvme", "--budget", "80%", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "policy lifetime on h100_sxm_pcie5_2nvme" in out and "fits                 yes" in out
    assert "(1.0000x)" in out and "stalls               0 points" in out
    for name in ("plan.json", "plan.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    plan = OffloadPlan.load(tmp_path / "plan.json")
    assert plan.device_budget_bytes == 1600 and plan.fits
    assert validate_plan(plan, load_trace(trace_file)) == []


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.5"], "below the feasible minimum 1600 bytes"),
    (["--policy", "lru"], "unknown offload policy 'lru'"),
    (["--budget", "3x"], "budget '3x' is not valid"),
    (["--tier-budget", "host"], "--tier-budget 'host' is not valid"),
])
def test_plan_bad_input_exits_2_with_one_line(trace_file, capsys, args, message):
    assert cli_main(["plan", trace_file, "tiers=h100_sxm_pcie5_2nvme", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierflow: error: ") and message in err and err.count("\n") == 1


def test_plan_missing_trace_or_hardware(tmp_path, trace_file, capsys):
    assert cli_main(["plan", str(tmp_path / "nope.tftrace"), "tiers=h100_sxm_pcie5_2nvme"]) == 2
    assert "does not exist; run `tierflow profile` first" in capsys.readouterr().err
    assert cli_main(["plan", trace_file]) == 2
    assert "no hardware model: pick a preset" in capsys.readouterr().err
    (tmp_path / "bad.tftrace").write_bytes(b"garbage")
    assert cli_main(["plan", str(tmp_path / "bad.tftrace"), "tiers=h100_sxm_pcie5_2nvme"]) == 2
    assert "not a tierflow trace file" in capsys.readouterr().err


def test_parse_budget():
    assert parse_budget("0.5") == ("fraction", 0.5) and parse_budget("50%") == ("fraction", 0.5)
    assert parse_budget("1") == ("fraction", 1.0) and parse_budget("4GiB") == ("bytes", 4 << 30)
    assert parse_budget("123456") == ("bytes", 123456)


def test_offload_config_group_selects_policy_and_budgets():
    from tierflow.trainer.compose import load_config
    from tierflow.trainer.config import ConfigError

    cfg, _ = load_config(["offload=lifetime", "offload.device_budget_fraction=0.5", "+offload.tier_budget_bytes.host=1000"])
    assert cfg.offload.policy == "lifetime"
    assert cfg.offload.budgets() == Budgets(device_fraction=0.5, tier_bytes=(("host", 1000),))
    with pytest.raises(ConfigError, match="offload.device_budget_fraction=-1.0 must be > 0"):
        load_config(["offload.device_budget_fraction=-1"])


def test_plan_creates_a_missing_out_directory_owner_only(tmp_path, trace_file):
    out = tmp_path / "plans" / "a"
    rc = cli_main(["plan", trace_file, "tiers=h100_sxm_pcie5_2nvme", "--budget", "80%", "--out", str(out)])
    assert rc == 0
    assert (out / "plan.json").is_file() and stat.S_IMODE(out.stat().st_mode) == 0o700
