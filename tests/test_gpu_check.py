"""The prepared GPU check (issue 17) stays runnable: its dry run on CPU collects every cuda-marked
test and runs the GPU benchmark's variants on a tiny model, all into one results file."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_dry_run_collects_the_cuda_tests_and_runs_every_benchmark_variant(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    results = (tmp_path / "gpu_check.txt").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--collect-only",
                                "-p", "no:cacheprovider", "tests/"], cwd=ROOT, capture_output=True, text=True)
    cuda_tests = [line for line in collected.stdout.splitlines() if "::" in line]
    assert cuda_tests and all(t in results for t in cuda_tests)
    figures = json.loads((tmp_path / "gpu_offload.json").read_text())
    names = [row["variant"] for row in figures["tokens"]]
    assert names == ["unconstrained", "tierflow@90%", "tierflow@80%", "save_on_cpu", "torchtune-style offload",
                     "checkpoint every block"]
    assert all(row["bit_identical"] for row in figures["tokens"])  # every variant trains the same steps
    assert figures["bandwidth"]["tier_read_gbps"] > 0 and "write_gbps" in figures["nvme"]["posix"]
    assert "benchmark exit status 0" in results
    assert "transfer cost exit status 0" in results and "batched" in results
