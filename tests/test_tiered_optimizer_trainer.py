"""The tiered optimizer inside `tierflow train`, alone and next to the plan runtime."""

import warnings

import torch

from tierflow.offload.optim.optimizer import TieredOptimizer


def test_tierflow_train_with_the_tiered_optimizer_is_bit_identical(quiet, monkeypatch):
    from tierflow.trainer.compose import load_config
    from tierflow.trainer.train import train

    closed = []
    close = TieredOptimizer.close
    monkeypatch.setattr(TieredOptimizer, "close", lambda self: (closed.append(self.num_steps), close(self)))

    common = quiet + ["trainer.steps=6", "trainer.grad_accum=2", "trainer.global_batch=8"]
    tiered = ["optimizer.tiered.enabled=true", "optimizer.tiered.paths=[host]", "optimizer.tiered.subgroup_bytes=65536",
              "tiers.host.enabled=true", "tiers.host.budget_bytes=67108864", "tiers.host.slab_bytes=8388608"]
    runs = [train(load_config(common + extra + [f"logging.run_name=r{i}"])[0]) for i, extra in enumerate([[], tiered])]
    assert torch.equal(torch.tensor(runs[0].losses), torch.tensor(runs[1].losses))
    for (name, a), (_, b) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        assert torch.equal(a, b), name
    assert closed == [6]  # the trainer used the tiered optimizer for every step, then closed it


def test_trainer_with_tiered_optimizer_and_offload_runtime_shares_one_engine(quiet, monkeypatch):
    """Both on: the runtime plans in the optimizer's open tiers, moves no optimizer state, and
    the run stays bit-identical to a plain run without either."""
    from tierflow.offload.runtime.offload_runtime import OffloadRuntime
    from tierflow.trainer.compose import load_config
    from tierflow.trainer.train import train

    engines = []
    init = OffloadRuntime.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append((self.engine is not None and self.engine is getattr(self.optimizer, "engine", None),
                        self._movable))

    monkeypatch.setattr(OffloadRuntime, "__init__", spy)
    common = [q for q in quiet if q != "offload=none"] + ["trainer.steps=6", "trainer.global_batch=8"]
    tiered = ["offload=lifetime", "offload.device_budget_fraction=0.7", "optimizer.tiered.enabled=true",
              "optimizer.tiered.paths=[host]", "optimizer.tiered.subgroup_bytes=65536", "tiers.host.enabled=true",
              "tiers.host.budget_bytes=67108864", "tiers.host.slab_bytes=8388608"]
    plain = train(load_config(common + ["offload=none", "logging.run_name=plain"])[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both = train(load_config(common + tiered + ["logging.run_name=both"])[0])
    # The staging buffers the first traced step reads are the optimizer's, not another graph
    # (Note [what the optimizer holds]).
    assert not [w for w in caught if "profiled iterations differ" in str(w.message)]
    assert torch.equal(torch.tensor(plain.losses), torch.tensor(both.losses))
    for (name, a), (_, b) in zip(plain.model.named_parameters(), both.model.named_parameters()):
        assert torch.equal(a, b), name
    (shared, movable), = engines
    assert shared and "optimizer_state" not in movable
    assert both.summary["offload"]["steps"].get("planned", 0) > 0


def test_overlap_under_gradient_accumulation_follows_trainer_grad_accum(quiet, monkeypatch):
    """trainer.grad_accum=2 tells the tiered optimizer that a gradient is final after two backward
    passes: overlapped updates start only then, so no step has to be redone, and the run is exact."""
    from tierflow.trainer.compose import load_config
    from tierflow.trainer.config import ConfigError
    from tierflow.trainer.train import train

    redone = []
    close = TieredOptimizer.close
    monkeypatch.setattr(TieredOptimizer, "close", lambda self: (redone.append(self.num_redone_steps), close(self)))
    common = quiet + ["trainer.steps=4", "trainer.grad_accum=2", "trainer.global_batch=8", "trainer.grad_clip=0"]
    tiered = ["optimizer.tiered.enabled=true", "optimizer.tiered.paths=[host]", "optimizer.tiered.subgroup_bytes=65536",
              "optimizer.tiered.overlap_backward=true", "tiers.host.enabled=true", "tiers.host.budget_bytes=67108864",
              "tiers.host.slab_bytes=8388608"]
    runs = [train(load_config(common + extra + [f"logging.run_name=o{i}"])[0]) for i, extra in enumerate([[], tiered])]
    assert torch.equal(torch.tensor(runs[0].losses), torch.tensor(runs[1].losses))
    for (name, a), (_, b) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        assert torch.equal(a, b), name
    assert redone == [0]
    with __import__("pytest").raises(ConfigError, match="backward_passes_per_step=3 but trainer.grad_accum=2"):
        train(load_config(common + tiered + ["optimizer.tiered.backward_passes_per_step=3", "logging.run_name=bad"])[0])
