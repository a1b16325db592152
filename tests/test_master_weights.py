"""``trainer.precision=bf16_master``: bf16 weights and gradients on the device, fp32 master weights
and optimizer state as optimizer state (ZeRO-Offload's layout), so offloading pages them through
the tiers; bit-identical to the same recipe run in memory, and to the recipe written by hand."""

import copy

import pytest
import torch

from tierflow.offload import with_master_weights
from tierflow.trainer.compose import load_config
from tierflow.trainer.config import ConfigError
from tierflow.trainer.train import train


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
                                        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True})])
def test_the_step_is_the_hand_written_recipe_with_hooks_run_once(cls, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    by_hand = copy.deepcopy(model)
    opt = with_master_weights(cls)(model.parameters(), **kwargs)
    masters = [p.detach().float().clone() for p in by_hand.parameters()]
    reference = cls(masters, **kwargs)
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append([p.dtype for g in o.param_groups for p in g["params"]]))
    for _ in range(4):
        x = torch.randn(5, 8).to(torch.bfloat16)
        for m in (model, by_hand):
            m.zero_grad()
            m(x).float().pow(2).mean().backward()
        opt.step()
        for master, p in zip(masters, by_hand.parameters()):
            master.grad = p.grad.float()
        reference.step()
        with torch.no_grad():
            for master, p in zip(masters, by_hand.parameters()):
                p.copy_(master)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), by_hand.parameters()))
    assert seen == [[torch.bfloat16] * 4] * 4  # once per step, seeing the real (bf16) parameters
    state = opt.state[model[0].weight]
    assert state["master"].dtype == torch.float32 and torch.equal(state["master"], masters[0])
    assert len(opt.state) == 4  # no master left behind as a key


def _run(quiet, *extra, batch=8):
    base = [o for o in quiet if o != "offload=none"] + ["trainer.steps=6", f"trainer.global_batch={batch}",
                                                         "trainer.precision=bf16_master"]
    return train(load_config(base + list(extra))[0])


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_offloaded_masters_train_bit_identically_to_the_recipe_in_memory(quiet, clip):
    """Clipped (norms taken as gradients become final) and unclipped (each sub-group updated
    inside backward): the masters and moments wait in the host tier between uses."""
    plain = _run(quiet, "offload=none", f"trainer.grad_clip={clip}", "logging.run_name=plain")
    paged = _run(quiet, "offload.device_budget_fraction=0.3", f"trainer.grad_clip={clip}", "logging.run_name=paged")
    assert torch.equal(torch.tensor(plain.losses), torch.tensor(paged.losses))
    assert paged.summary["param_digests"] == plain.summary["param_digests"]
    assert all(p.dtype == torch.bfloat16 for p in paged.model.parameters())
    o = paged.summary["offload"]
    assert o["steps"].get("planned", 0) == 3 and not o["steps"].get("fallback")
    assert o["peak_by_mode"]["planned"] <= o["device_budget_bytes"] and sum(o["bytes_out"].values()) > 0


def test_the_tiered_optimizer_is_refused_before_work(quiet):
    with pytest.raises(ConfigError, match="bf16_master keeps fp32 master weights"):
        _run(quiet, "optimizer.tiered.enabled=true", "optimizer.tiered.paths=[host]")


def test_a_state_built_into_nvme_trains_within_a_third_of_it(quiet, tmp_path):
    """Out of core: bf16 parameters materialised straight into the NVMe tier, their fp32 masters
    and moments born there at the first step; every step within a byte budget of a third of
    the training state, bit-identical to the recipe in memory."""
    plain = _run(quiet, "offload=none", "logging.run_name=plain", batch=2)
    state = 16 * sum(p.numel() for p in plain.model.parameters())  # bf16 w + g, fp32 master + 2 moments
    paged = _run(quiet, f"offload.device_budget_bytes={state // 3}", "tiers.nvme.enabled=true",
                 f"tiers.nvme.dirs=[{tmp_path}]", "tiers.host.enabled=false", "logging.run_name=ooc", batch=2)
    assert torch.equal(torch.tensor(plain.losses), torch.tensor(paged.losses))
    assert paged.summary["param_digests"] == plain.summary["param_digests"]
    o = paged.summary["offload"]
    assert o["out_of_core"] and set(o["bytes_out"]) == {"nvme:0"}
    assert all(0 < peak <= state // 3 for peak in o["peak_by_mode"].values()), o["peak_by_mode"]
