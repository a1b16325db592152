"""The tiered optimizer's overlap with backward: sub-groups updated while backward runs, exact
with accumulation, and redone when their gradients change after the early update (split from
test_tiered_optimizer.py)."""

import threading
import warnings

import pytest
import torch

from tests.test_tiered_optimizer import KiB, _model, _same, _same_state, _tiers
from tierflow.offload import TieredOptimizer, TieredOptimizerConfig

EARLY_UPDATE_WAIT_S = 60.0  # only a broken overlap ever waits this long; a passing test waits one update


class _EarlyUpdates:
    """Counts sub-group updates that finished off the test's thread, in the tiered optimizer's early
    copy phase, and lets backward block until one has (a condition variable, no polling).

    The count comes from the wrapped optimizer itself (:meth:`wrap`), whose ``step()`` runs once per
    sub-group: when it returns, that update has read its gradients and the tiered optimizer has
    recorded their versions, so whatever the test does to the gradients afterwards (clipping, another
    backward pass) is seen by the check in ``step()``.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._test_thread = threading.current_thread()
        self.count = 0

    def wrap(self, cls, *args, **kwargs):
        """``cls(*args, **kwargs)``, reporting here each ``step()`` that runs off the test's thread."""
        signal = self

        class Reporting(cls):
            def step(self, closure=None):
                out = super().step(closure)
                if threading.current_thread() is not signal._test_thread:
                    with signal._cond:
                        signal.count += 1
                        signal._cond.notify_all()
                return out

        return Reporting(*args, **kwargs)

    def wait_past(self, count):
        """Block until more than ``count`` early updates finished; fail the test after EARLY_UPDATE_WAIT_S."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.count > count, EARLY_UPDATE_WAIT_S):
                pytest.fail(f"no sub-group update finished during backward within {EARLY_UPDATE_WAIT_S:.0f} s "
                            f"({self.count} early updates so far): overlap_backward did not update a sub-group whose "
                            f"gradients were final before backward ended", pytrace=False)


class _WaitForEarlyUpdate(torch.autograd.Function):
    """Identity whose backward (at the model's input end, so backward is far from over) blocks until
    the optimizer finished updating a sub-group this step: makes "updates start before backward ends"
    observable, and fixes the order "early update reads gradients, then the test changes them"."""

    @staticmethod
    def forward(ctx, x, net):
        ctx.net = net
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        net = ctx.net
        if net.armed and net.opt.overlap_backward:
            net.early.wait_past(net.early_at_step_start)
        return grad, None


class _Net(torch.nn.Module):
    """The test model; with ``opt`` and ``early`` set, an armed backward waits for an early update."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.body = torch.nn.Embedding(50, 24), torch.nn.Sequential(*list(_model())[1:])
        self.opt, self.early, self.armed = None, None, False
        self.early_at_step_start = 0  # early.count when the step began

    def forward(self, x):
        h = self.emb(x)
        if self.opt is not None:
            h = _WaitForEarlyUpdate.apply(h, self)
        return self.body(h)


def _accumulating_train(model, opt, steps, passes, clip=0.0):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if model.early is not None:
            model.early_at_step_start = model.early.count
        for k in range(passes):
            x = torch.randint(0, 50, (4, 6), generator=gen)
            model.armed = k == passes - 1  # only the step's last backward can start updates
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten()) / passes
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


def test_overlap_starts_updates_during_backward_and_stays_exact_with_accumulation(tmp_path):
    plain_model, tiered_model = _Net(), _Net()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    cfg = TieredOptimizerConfig(paths=["nvme"], subgroup_bytes=3 * KiB, overlap_backward=True,
                                backward_passes_per_step=2)
    early = _EarlyUpdates()
    with TieredOptimizer(early.wrap(torch.optim.AdamW, tiered_model.parameters(), lr=1e-2), config=cfg,
                         tiers=_tiers(tmp_path, "nvme")) as opt:
        tiered_model.opt, tiered_model.early = opt, early
        _accumulating_train(plain_model, plain, steps=4, passes=2)
        _accumulating_train(tiered_model, opt, steps=4, passes=2)
        assert _same(plain_model, tiered_model)
        assert _same_state(plain.state_dict(), opt.state_dict())
        assert opt.counters["early_updates"] >= 4  # at least one sub-group per step began during backward
        assert opt.overlap_backward and opt.counters["redone_steps"] == 0


@pytest.mark.parametrize("case", ["clipping", "more_backward_passes_than_configured"])
def test_overlap_redoes_a_step_whose_gradients_changed_and_turns_itself_off(tmp_path, case):
    clip, passes = (0.05, 1) if case == "clipping" else (0.0, 2)
    plain_model, tiered_model = _Net(), _Net()
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-2)
    cfg = TieredOptimizerConfig(paths=["host"], subgroup_bytes=3 * KiB, overlap_backward=True)
    early = _EarlyUpdates()
    with TieredOptimizer(early.wrap(torch.optim.Adam, tiered_model.parameters(), lr=1e-2), config=cfg,
                         tiers=_tiers(tmp_path, "host")) as opt:
        tiered_model.opt, tiered_model.early = opt, early
        _accumulating_train(plain_model, plain, steps=3, passes=passes, clip=clip)
        with pytest.warns(UserWarning, match=r"overlap_backward: .* this step was redone .* exactly, and overlap is off"):
            warnings.simplefilter("always")
            _accumulating_train(tiered_model, opt, steps=3, passes=passes, clip=clip)
        assert _same(plain_model, tiered_model)
        assert _same_state(plain.state_dict(), opt.state_dict())
        assert not opt.overlap_backward and opt.counters["redone_steps"] == 1


def test_the_runtime_never_shrinks_what_an_early_update_reads(tmp_path):
    # Note [no shrinking under an early step] (tierflow.offload.runtime.offload_runtime): the early
    # update reads gradients and parameters on its own thread while backward runs; the runtime's
    # plan would shrink those storages at their free points meanwhile. With an overlapping tiered
    # optimizer the runtime moves activations only, and the run stays exact.
    from tierflow.offload import OffloadConfig, OffloadRuntime

    plain_model, tiered_model = _Net(), _Net()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    cfg = TieredOptimizerConfig(paths=["host"], subgroup_bytes=3 * KiB, overlap_backward=True)
    early = _EarlyUpdates()
    with TieredOptimizer(early.wrap(torch.optim.AdamW, tiered_model.parameters(), lr=1e-2), config=cfg,
                         tiers=_tiers(tmp_path, "host")) as opt:
        tiered_model.opt, tiered_model.early = opt, early
        with pytest.warns(UserWarning, match="parameters and gradients stay on the device"):
            rt = OffloadRuntime(tiered_model, opt, OffloadConfig(policy="lifetime", device_budget_fraction=0.9),
                                tiers=_tiers(tmp_path / "rt", "host"))
        _accumulating_train(plain_model, plain, steps=6, passes=1)
        gen = torch.Generator().manual_seed(1)
        with rt:
            for _ in range(6):
                opt.zero_grad(set_to_none=True)
                tiered_model.early_at_step_start = early.count
                x = torch.randint(0, 50, (4, 6), generator=gen)
                tiered_model.armed = True
                with rt.step(x):
                    torch.nn.functional.cross_entropy(tiered_model(x).flatten(0, 1), x.roll(1, 1).flatten()).backward()
                    opt.step()
            assert rt.plan is not None and {d.category for d in rt.plan.decisions} == {"activation"}
            assert rt.summary()["steps"]["planned"] >= 3
        assert _same(plain_model, tiered_model)
        assert opt.counters["early_updates"] >= 6 and opt.overlap_backward
