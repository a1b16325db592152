"""Issue 15 item 13: a training state that cannot fit its tiers is refused when the tiers open,
in one paragraph that says what to change, before the run directory exists and before any
step; it used to be found at step 1 (the tiered optimizer's first state) or 3 (the plan)."""

import torch

from tierflow.offload import NvmeTier, NvmeTierConfig, TieredOptimizer, TieredOptimizerConfig
from tierflow.trainer import cli


def _run(tmp_path, capsys, *extra):
    swap = tmp_path / "swap"
    swap.mkdir(exist_ok=True)
    runs = tmp_path / "runs"
    code = cli.main(["train", "logging=none", "logging.progress=false", "logging.plot=false",
                     f"logging.run_root={runs}", "trainer.steps=4", "trainer.global_batch=8",
                     "tiers.nvme.enabled=true", f"tiers.nvme.dirs=[{swap}]", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, runs


def test_an_optimizer_state_larger_than_its_nvme_budget_is_refused_before_training(tmp_path, capsys):
    code, err, runs = _run(tmp_path, capsys, "offload=none", "optimizer.tiered.enabled=true",
                           "optimizer.tiered.paths=[nvme]", "optimizer.tiered.subgroup_bytes=65536",
                           "tiers.nvme.budget_bytes=1048576")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("tierflow: error: TierFullError: the optimizer state (") and "does not fit" in err[0]
    assert "optimizer.tiered.paths" in err[0] and "nvme took" in err[0]
    assert not runs.exists()  # before the run directory, before any step


def test_a_state_larger_than_budget_plus_tiers_is_refused_before_the_model_is_built(tmp_path, capsys):
    code, err, runs = _run(tmp_path, capsys, "offload.device_budget_bytes=1048576", "tiers.host.enabled=false",
                           "tiers.nvme.budget_bytes=2097152", "offload.build_in_tier=never")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("tierflow: error: TierFullError: the training state (")
    assert "nowhere to go" in err[0] and "nvme 0.00 GiB" in err[0] and "tiers.nvme.dirs" in err[0]
    assert not runs.exists()


def test_the_prediction_is_the_layout_the_first_step_makes(tmp_path):
    """The check places what the optimizer will really store: after one step, every sub-group's
    slot has the predicted size (AdamW's two moments, SGD's momentum, RMSprop's three buffers)."""
    from tierflow.offload.optim._state import predict_state_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-3), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True)):
        swap = tmp_path / "swap"
        swap.mkdir(exist_ok=True)
        tier = NvmeTier(NvmeTierConfig(enabled=True, dirs=[str(swap)]))
        try:
            inner = make(list(model.parameters()))
            opt = TieredOptimizer(inner, config=TieredOptimizerConfig(enabled=True, paths=["nvme"], subgroup_bytes=16384),
                                  tiers={"nvme": tier})
            predicted = [predict_state_bytes(inner, [(0, opt._params[i]) for i in g.param_ids])
                         for g in opt.subgroups]
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
            real = [opt._pipe.records[g.index].layout.nbytes for g in opt.subgroups]
            assert predicted == real and all(n > 0 for n in real)
            opt.close()
        finally:
            tier.close()


def test_a_state_that_fits_is_not_refused(tmp_path, capsys):
    code, err, _ = _run(tmp_path, capsys, "offload=none", "optimizer.tiered.enabled=true",
                        "optimizer.tiered.paths=[nvme]", "optimizer.tiered.subgroup_bytes=65536",
                        "tiers.nvme.budget_bytes=67108864", "trainer.steps=2")
    assert code == 0, err
