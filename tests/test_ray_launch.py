"""launch/ray_launch.py: N Ray workers train as torch.distributed ranks; a dead worker restarts the group."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import PYTHON, REPO

ray = pytest.importorskip("ray", reason="ray is installed by the dev extra; run ./launch/setup.sh test")

_spec = importlib.util.spec_from_file_location("ray_launch", REPO / "launch" / "ray_launch.py")
ray_launch = importlib.util.module_from_spec(_spec)
sys.modules["ray_launch"] = ray_launch  # dataclasses look their module up while the class is built
_spec.loader.exec_module(ray_launch)

COMMON = ["logging=none", "logging.progress=false", "logging.plot=false", "offload=none",
          "trainer.steps=6", "trainer.global_batch=8", "trainer.eval_every=0", "trainer.eval_batches=1"]


def _launch(args, tmp_path, env, timeout=240):
    cmd = [PYTHON, str(REPO / "launch" / "ray_launch.py"), *args, *COMMON, f"logging.run_root={tmp_path}"]
    env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_rank_environment_numbers_local_ranks_per_node():
    nodes = ["a", "b", "a", "b", "a"]
    envs = [ray_launch.rank_environment(r, 5, nodes, "10.0.0.1", 29400) for r in range(5)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "1", "1", "2"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["3", "2", "3", "2", "3"]
    assert [e["GROUP_RANK"] for e in envs] == ["0", "1", "0", "1", "0"]
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"} and envs[4]["WORLD_SIZE"] == "5"


def test_bad_launch_settings_and_overrides_fail_before_ray_starts():
    with pytest.raises(ValueError, match="--workers 0 must be >= 1"):
        ray_launch.launch(ray_launch.LaunchConfig(workers=0), [])
    with pytest.raises(ValueError, match="world size 3 does not divide"):
        ray_launch.launch(ray_launch.LaunchConfig(workers=3), ["trainer.global_batch=8"])
    assert not ray.is_initialized()


@pytest.mark.slow
def test_two_workers_finish_with_identical_parameters(tmp_path, subprocess_env):
    proc = _launch(["--workers", "2", "logging.run_name=ray"], tmp_path, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on every rank: True" in proc.stdout
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["param_digests"]) == 2 and summary["param_digests"][0] == summary["param_digests"][1]


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group(tmp_path, subprocess_env):
    marker = tmp_path / "killed"
    model = ["model._target_=tests._faults.KillOnceLM", f"+model.kwargs.marker={marker}",
             "+model.kwargs.kill_at_call=3", "logging.run_name=restart"]
    failed = _launch(["--workers", "2", *model], tmp_path, subprocess_env)
    assert failed.returncode == 1 and marker.exists()
    assert "--max-restarts 0 is spent" in failed.stderr

    marker.unlink()
    proc = _launch(["--workers", "2", "--max-restarts", "1", *model[:-1], "logging.run_name=restart2"],
                   tmp_path, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists() and "restarting all 2 workers" in proc.stderr
    assert "parameters identical on every rank: True" in proc.stdout
