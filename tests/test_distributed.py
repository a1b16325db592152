"""Two ranks under torchrun with gloo: the run finishes and both ranks hold identical parameters."""

import json
import subprocess

import numpy as np
import pytest

from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.slow


def _torchrun(args, env, timeout=300):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tierflow.trainer.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_finish_with_identical_parameters(tmp_path, subprocess_env):
    common = ["logging=none", "offload=none", "logging.progress=false", "logging.plot=false", f"logging.run_root={tmp_path}",
              "trainer.steps=8", "trainer.global_batch=16", "trainer.grad_accum=2", "trainer.eval_every=4",
              "trainer.eval_batches=1"]
    proc = _torchrun(common + ["logging.run_name=ddp"], subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Only rank 0 prints the summary.
    assert proc.stdout.count("tierflow: trained") == 1

    # Each rank trained on its own half of the same global batches: the 2-rank losses track a
    # 1-process run over the same samples (equal up to the order of the gradient sums).
    single = subprocess.run([PYTHON, "-m", "tierflow.trainer.train", *common, "logging.run_name=single"], cwd=REPO,
                            env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses("ddp"), losses("single"), rtol=1e-4)


def test_world_size_not_dividing_the_batch_fails_on_every_rank_before_work(tmp_path, subprocess_env):
    proc = _torchrun(["logging=none", f"logging.run_root={tmp_path / 'runs'}", "trainer.global_batch=15"],
                     subprocess_env)
    assert proc.returncode != 0
    assert "world size 2 does not divide" in proc.stderr
    assert not (tmp_path / "runs").exists()
