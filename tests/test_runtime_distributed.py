"""Offloading under torchrun: every rank plans for itself and the run stays bit-identical to DDP alone;
a node whose ranks would oversubscribe host memory is refused before the first step."""

import json
import subprocess

import psutil
import pytest

from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.slow

COMMON = ["logging=none", "logging.progress=false", "logging.plot=false", "trainer.steps=6", "trainer.global_batch=16",
          "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.device=cpu"]


def _torchrun(args, env, timeout=300):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tierflow.trainer.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_with_offloading_match_two_ranks_without(tmp_path, subprocess_env):
    runs = {}
    for name, extra in (("plain", ["offload=none"]), ("offloaded", ["offload=lifetime", "offload.device_budget_fraction=0.6"])):
        proc = _torchrun(COMMON + extra + [f"logging.run_root={tmp_path}", f"logging.run_name={name}"], subprocess_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (summary, losses)
    (plain, plain_losses), (ours, our_losses) = runs["plain"], runs["offloaded"]
    assert ours["world_size"] == 2
    assert our_losses == plain_losses
    assert ours["param_digests"] == plain["param_digests"] and len(set(ours["param_digests"])) == 1
    o = ours["offload"]  # rank 0's runtime: it planned and moved activations / optimizer states, nothing else
    assert o["steps"].get("planned", 0) == 3 and o["divergent_iterations"] == 0
    assert sum(o["bytes_out"].values()) > 0 and o["device_peak_bytes"] <= o["device_budget_bytes"]


def test_oversubscribed_host_tiers_are_refused_before_any_step(tmp_path, subprocess_env):
    too_big = psutil.virtual_memory().total // 2 + (1 << 30)  # each of 2 ranks asks for over half the RAM
    proc = _torchrun(COMMON + [f"tiers.host.budget_bytes={too_big}", f"logging.run_root={tmp_path / 'runs'}"],
                     subprocess_env)
    assert proc.returncode != 0
    assert "host memory is oversubscribed: 2 rank(s) on this node" in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before the run directory, let alone a step
