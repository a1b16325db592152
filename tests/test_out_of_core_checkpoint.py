"""Checkpoints of a training state that lives in the tiers: streamed to disk and back, one tensor at
a time (``tierflow.trainer.checkpoint.streamed``), and a run killed with SIGKILL resumes from them
bit-identically.

The peak-RSS bound of persisting (never the whole state in RAM) is asserted where the state is
several times the budget: ``tests/test_out_of_core.py`` persists twice inside its measured run.
"""

import json
import subprocess
from pathlib import Path

import torch

from tests.conftest import PYTHON
from tierflow.trainer.checkpoint.persist import find_checkpoints, verify_checkpoint
from tierflow.trainer.checkpoint.streamed import load_streamed, save_streamed

CHILD = Path(__file__).with_name("_rss_child.py")


def _overrides(tmp_path: Path, name: str, marker: Path, *extra: str):
    return ["logging=none", "logging.progress=false", "logging.plot=false", f"logging.run_root={tmp_path / name}",
            "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.global_batch=8", "trainer.steps=7",
            "model._target_=tests._faults.KillOnceGPT", f"+model.kwargs.marker={marker}",
            "+model.kwargs.kill_at_call=6", "+model.kwargs.d_model=128", *extra]


def _run(args, env):
    return subprocess.run([PYTHON, str(CHILD), *args], env=env, capture_output=True, text=True, timeout=600)


def _summary(run_root: Path) -> dict:
    (done,) = run_root.glob("*/summary.json")  # the killed run left a directory with no summary
    return json.loads(done.read_text())


def test_a_state_in_the_tiers_killed_with_sigkill_resumes_from_its_streamed_checkpoint_exactly(tmp_path,
                                                                                                 subprocess_env):
    never = tmp_path / "never"
    never.touch()  # the reference: the marker says the kill already happened
    ref = _run(_overrides(tmp_path, "ref", never, "offload=none"), subprocess_env)
    assert ref.returncode == 0, ref.stderr[-2000:]

    nvme, ckpt, marker = tmp_path / "nvme", tmp_path / "ckpt", tmp_path / "killed"
    nvme.mkdir()
    tiered = _overrides(tmp_path, "tiered", marker, "offload=lifetime", "offload.device_budget_bytes=4000000",
                        "offload.build_in_tier=always", "tiers.nvme.enabled=true", f"tiers.nvme.dirs=[{nvme}]",
                        "tiers.host.enabled=false", "checkpoint=memory", "checkpoint.every_steps=2",
                        "checkpoint.parity_shards=0", f"checkpoint.dir={ckpt}")
    killed = _run(tiered, subprocess_env)
    assert killed.returncode == -9 and marker.exists(), killed.stderr[-2000:]
    # Killed in step 6: the copies of steps 2 and 4 are complete (keep=2), nothing else is chosen.
    assert [s for s, _ in find_checkpoints(ckpt)] == [4, 2]
    assert all(verify_checkpoint(p) is None for _, p in find_checkpoints(ckpt))

    again = _run(tiered, subprocess_env)  # the same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 4" in again.stdout
    got, want = _summary(tmp_path / "tiered"), _summary(tmp_path / "ref")
    assert got["offload"]["out_of_core"] and got["checkpoint_streamed"]
    assert got["resumed_from_step"] == 4 and got["checkpoints_persisted"] == 2  # steps 6 and 7 (the end)
    assert got["param_digests"] == want["param_digests"]
    assert got["final_loss"] == want["final_loss"]
    assert max(got["offload"]["peak_by_mode"].values()) <= 4000000
    assert 16 * got["parameters"] > 4000000  # the training state does not fit the budget


class _Away:
    """A stand-in for the offload runtime's ``resident``: it records that the block was entered."""

    def __init__(self) -> None:
        self.entered = 0

    def __call__(self):
        from contextlib import nullcontext

        self.entered += 1
        return nullcontext()


def test_a_streamed_copy_round_trips_every_tensor_and_the_optimizer_hyperparameters(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    model(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    resident = _Away()
    save_streamed(tmp_path, 1, model, opt, None, config_hash="h", note={"loss": 1.5}, keep=2, resident=resident)
    (_, path), = find_checkpoints(tmp_path)
    assert verify_checkpoint(path) is None and resident.entered == 1

    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    other_opt = torch.optim.AdamW(other.parameters(), lr=1.0)
    step, note = load_streamed(path, other, other_opt, None, resident=resident)
    assert (step, note, resident.entered) == (1, {"loss": 1.5}, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_opt.param_groups[0]["lr"] == 3e-3 and other_opt.param_groups[0]["weight_decay"] == 0.05
    for p, q in zip(model.parameters(), other.parameters()):
        assert opt.state[p].keys() == other_opt.state[q].keys()
        assert all(torch.equal(opt.state[p][k], other_opt.state[q][k]) for k in opt.state[p])
