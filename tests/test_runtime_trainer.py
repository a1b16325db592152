"""The trainer's offload switch: the default config offloads, bit-identically, and writes its plan."""

import json
import stat

import pytest
import torch

from tierflow.trainer.compose import load_config
from tierflow.trainer.summary import format_summary
from tierflow.trainer.train import train


def _train(overrides):
    cfg, _ = load_config(overrides)
    return train(cfg)


def test_default_config_trains_with_offloading_exactly_and_saves_the_plan(quiet):
    base = [o for o in quiet if o != "offload=none"] + ["trainer.steps=8", "trainer.global_batch=16"]
    cfg, _ = load_config(base)
    assert cfg.offload.policy == "lifetime" and cfg.offload.device_budget_fraction == 0.5 and cfg.tiers.host.enabled
    off = _train(base + ["offload=none", "logging.run_name=plain"])
    on = _train(base + ["logging.run_name=offloaded"])
    assert torch.equal(torch.tensor(off.losses), torch.tensor(on.losses))
    assert on.summary["param_digests"] == off.summary["param_digests"]
    o = on.summary["offload"]
    assert o["steps"] == {"warmup": 1, "profile": 2, "planned": 5}
    assert sum(o["bytes_out"].values()) > 0 and o["device_peak_bytes"] <= o["device_budget_bytes"]
    for name in ("plan.json", "plan.txt", "trace.tftrace"):
        assert stat.S_IMODE((on.run_dir / name).stat().st_mode) == 0o600, name
    lines = [json.loads(line) for line in (on.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["offload/bytes_out/host"] > 0 and "offload/stall_s" in lines[-1]
    text = format_summary(on.summary)
    assert "of the unconstrained peak" in text and "computed peak" in text and "(measured: process RSS)" in text


def test_impossible_budget_fails_fast_in_the_trainer(quiet):
    from tierflow.offload import PlanningError

    with pytest.raises(PlanningError, match="feasible minimum"):
        _train([o for o in quiet if o != "offload=none"] + ["trainer.steps=50", "offload.device_budget_fraction=0.02"])


def test_evaluation_between_steps_sees_every_tensor_and_is_bit_identical(quiet, tmp_path):
    """Parameters that wait in a tier across the step boundary (zero_infinity keeps them on NVMe)
    come back for evaluation, and training re-enters the plan afterwards; it used to crash in
    evaluate() on an empty storage."""
    swap = tmp_path / "swap"
    swap.mkdir()
    base = [o for o in quiet if o not in ("offload=none", "trainer.eval_every=0")] + [
        "trainer.steps=7", "trainer.global_batch=8", "trainer.eval_every=2"]
    off = _train(base + ["offload=none", "logging.run_name=plain"])
    on = _train(base + ["offload=zero_infinity", "tiers.nvme.enabled=true", f"tiers.nvme.dirs=[{swap}]",
                        "logging.run_name=nvme"])
    assert torch.equal(torch.tensor(off.losses), torch.tensor(on.losses))
    assert on.val_losses == off.val_losses and len(on.val_losses) == 4
    assert on.summary["param_digests"] == off.summary["param_digests"]
    steps = on.summary["offload"]["steps"]
    assert steps.get("planned", 0) >= 3 and not steps.get("fallback")


def test_a_budget_far_below_the_training_state_trains_exactly(quiet):
    """With the optimizer stepped (and clipped) one parameter at a time, the plan pages parameters,
    gradients and AdamW states through the update: 15% of the unconstrained peak, a budget below
    the training state (weights, gradients and moments alone are over half the peak), trains
    bit-identically to no offloading. The model is built on the device (a fraction names no bytes
    before the trace), so the first step starts holding every parameter and evicts at its first
    point; every later step, profiled ones included, stays within the budget."""
    base = [o for o in quiet if o != "offload=none"] + ["model=small", "trainer.steps=6", "trainer.global_batch=8"]
    off = _train(base + ["offload=none", "logging.run_name=plain"])
    on = _train(base + ["offload.device_budget_fraction=0.15", "logging.run_name=low"])
    assert torch.equal(torch.tensor(off.losses), torch.tensor(on.losses))
    assert on.summary["param_digests"] == off.summary["param_digests"]
    o = on.summary["offload"]
    assert o["steps"].get("planned", 0) == 3 and not o["steps"].get("fallback")
    state = 4 * sum(p.numel() * p.element_size() for p in on.model.parameters())  # AdamW: w, g, m, v
    assert o["device_budget_bytes"] < 0.5 * state
    peaks = [r["offload/device_peak_bytes"] for r in on.records]
    assert max(peaks[1:]) <= o["device_budget_bytes"] < peaks[0]
    assert o["peak_by_mode"]["profile"] <= o["device_budget_bytes"]
