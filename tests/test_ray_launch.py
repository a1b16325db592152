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


def _losses(run_dir):
    """The last recorded loss of every step (a resumed run appends the steps it redoes)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_workers_agree_and_a_killed_one_restarts_the_group_resuming_from_memory(tmp_path, subprocess_env,
                                                                                   snapshot_store_dir):
    marker = tmp_path / "killed"
    model = ["model._target_=tests._faults.KillOnceLM", f"+model.kwargs.marker={marker}",
             "+model.kwargs.kill_at_call=5", "trainer.steps=8"]
    snapshots = ["checkpoint=memory", "checkpoint.every_steps=1", "checkpoint.parity_shards=0",
                 "checkpoint.persist_every=0", "checkpoint.persist_on_finish=false",
                 f"checkpoint.store_dir={snapshot_store_dir}"]
    proc = _launch(["--workers", "2", "--max-restarts", "1", *model, *snapshots, "logging.run_name=restart"],
                   tmp_path, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists() and "restarting all 2 workers (1 restart left)" in proc.stderr
    assert "resumed from step" in proc.stdout, proc.stdout[-2000:]
    assert "parameters identical on every rank: True" in proc.stdout

    # The same run, uninterrupted (the marker is there: nothing is killed) on two fresh workers:
    # both ranks end with identical parameters, and every loss of the restarted run equals its own.
    reference = _launch(["--workers", "2", *model, "logging.run_name=reference"], tmp_path, subprocess_env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "parameters identical on every rank: True" in reference.stdout
    summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["param_digests"])) == 1
    assert _losses(tmp_path / "restart") == _losses(tmp_path / "reference")


def test_a_dead_group_without_restarts_left_fails_with_the_cause(monkeypatch):
    """The restart loop gives up after --max-restarts, naming the failure (Ray itself is faked)."""

    class Died(Exception):
        pass

    class FakeRay:
        class exceptions:
            RayActorError = Died
            RayTaskError = Died

    calls = []

    def run_group(ray, workers, overrides):
        calls.append(len(workers))
        raise Died("The actor died unexpectedly before finishing this task.\nworker exit: SIGKILL")

    monkeypatch.setattr(ray_launch, "_run_group", run_group)
    with pytest.raises(RuntimeError, match="--max-restarts 1 is spent: worker exit: SIGKILL"):
        ray_launch._attempts(FakeRay, lambda: [object(), object()], [], max_restarts=1, kill=lambda w: None)
    assert calls == [2, 2]
