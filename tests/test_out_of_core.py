"""Training a state that does not fit: built into a tier, trained inside its budget from step 0.

On a machine without a GPU the device is RAM, so the acceptance is the peak RSS the OS measures
(``VmHWM``) of a child process, against the budget plus a fixed overhead measured the same way
(docs/out_of_core.md, "What the peak RSS is made of").
"""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON

CHILD = Path(__file__).with_name("_rss_child.py")
MiB = 2 ** 20
#: The runtime's own memory beyond the budget: NVMe bounce buffers (one chunk per I/O worker), the
#: record table of the profiled iterations and the planner's working set, allocator slack.
RUNTIME_OVERHEAD = 96 * MiB


def _train(tmp_path: Path, env, name: str, *overrides: str) -> dict:
    run_root = tmp_path / name
    args = ["logging=none", "logging.progress=false", "logging.plot=false", f"logging.run_root={run_root}",
            "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.global_batch=8", *overrides]
    done = subprocess.run([PYTHON, str(CHILD), *args], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    (run_dir,) = run_root.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"growth": rss["peak_rss_bytes"] - rss["baseline_rss_bytes"], "summary": summary,
            "losses": [m["loss"] for m in metrics if "loss" in m], "metrics": metrics}


def test_a_state_four_times_the_budget_trains_in_rss_under_the_budget_and_bit_identically(tmp_path, subprocess_env):
    """The built-in ``small`` GPT (10.75M parameters: 172 MB of fp32 weights, gradients and AdamW
    moments) under a 40 MB budget: the trainer builds it straight into the NVMe tier, every step
    (warm-up and profiling included) keeps the budget, the process's peak RSS grows by at most the
    budget plus the trainer's fixed cost plus the runtime's overhead, and losses and weights are
    bit-identical to training it in memory, which needs far more."""
    budget = 40_000_000
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    fixed = _train(tmp_path, subprocess_env, "fixed", "model=tiny", "trainer.steps=3", "offload=none")["growth"]
    plain = _train(tmp_path, subprocess_env, "plain", "model=small", "trainer.steps=10", "offload=none")
    tiered = _train(tmp_path, subprocess_env, "tiered", "model=small", "trainer.steps=10", "offload=lifetime",
                    f"offload.device_budget_bytes={budget}", "tiers.nvme.enabled=true", f"tiers.nvme.dirs=[{nvme}]",
                    "tiers.host.enabled=false")
    o = tiered["summary"]["offload"]
    state = 16 * tiered["summary"]["parameters"]
    assert state >= 4 * budget
    assert o["out_of_core"], "the trainer should have built the model into the tier"
    assert tiered["losses"] == plain["losses"]
    assert tiered["summary"]["param_digests"] == plain["summary"]["param_digests"]
    # The budget from the first step: warm-up and profiled steps ran under it too.
    assert set(o["peak_by_mode"]) >= {"warmup", "profile", "planned"}
    assert max(m["offload/device_peak_bytes"] for m in tiered["metrics"]) <= budget
    assert o["device_peak_bytes"] <= budget
    # Measured by the OS: the budget, the trainer's fixed cost, the runtime's overhead; no more.
    bound = budget + fixed + RUNTIME_OVERHEAD
    assert tiered["growth"] <= bound, (tiered["growth"] / MiB, bound / MiB)
    assert plain["growth"] > bound  # in memory it does not fit the same bound: the test can fail


def test_a_state_that_must_go_to_a_tier_with_none_open_is_refused_before_work(tmp_path, subprocess_env):
    """The state does not fit the byte budget and no tier below RAM is open: one line says which
    tier to enable, before the model is built."""
    done = subprocess.run([PYTHON, "-m", "tierflow.trainer.train", "logging=none", "logging.progress=false",
                           f"logging.run_root={tmp_path}", "model=small", "trainer.steps=1", "offload=lifetime",
                           "offload.device_budget_bytes=40000000", "tiers.nvme.enabled=false"],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "tiers.nvme.enabled=true" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("extra, says", [
    (["checkpoint=memory"], "checkpoint=none"),
    (["optimizer.tiered.enabled=true"], "optimizer.tiered.enabled=false"),
])
def test_out_of_core_refuses_what_needs_the_whole_state_in_memory(tmp_path, subprocess_env, extra, says):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    done = subprocess.run([PYTHON, "-m", "tierflow.trainer.train", "logging=none", "logging.progress=false",
                           f"logging.run_root={tmp_path}", "model=small", "trainer.steps=1", "offload=lifetime",
                           "offload.device_budget_bytes=40000000", "tiers.nvme.enabled=true",
                           f"tiers.nvme.dirs=[{nvme}]", *extra],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert says in done.stderr and "Traceback" not in done.stderr
