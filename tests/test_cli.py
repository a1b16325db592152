"""The installed entry points: the tierflow console script, python -m tierflow.trainer.train, launch scripts."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import PYTHON, REPO


def _tierflow():
    script = shutil.which("tierflow", path=os.path.dirname(PYTHON))
    if script is None:
        pytest.fail("the tierflow console script is not installed next to this interpreter; run pip install -e .")
    return script


def test_console_script_help_lists_train():
    proc = subprocess.run([_tierflow(), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout


def test_dry_run_checks_a_1b_model_without_allocating_or_writing(tmp_path, subprocess_env):
    proc = subprocess.run([_tierflow(), "train", "--dry-run", "model=gpt1b", f"logging.run_root={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env)
    assert proc.returncode == 0, proc.stderr
    assert "dry run OK" in proc.stdout and "1,208,815,616 parameters" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_bad_override_exits_2_with_one_line(tmp_path, subprocess_env):
    proc = subprocess.run([_tierflow(), "train", "trainer.stepz=3"], capture_output=True, text=True, timeout=120,
                          env=subprocess_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown config key 'trainer.stepz'" in proc.stderr


def test_python_m_trainer_train_runs_and_prints_a_summary(tmp_path, subprocess_env):
    proc = subprocess.run([PYTHON, "-m", "tierflow.trainer.train", "logging=none", f"logging.run_root={tmp_path}",
                           "logging.run_name=m", "trainer.steps=3", "trainer.eval_every=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=subprocess_env)
    assert proc.returncode == 0, proc.stderr
    for field in ("loss", "throughput", "peak memory", "run dir"):
        assert field in proc.stdout
    assert str(tmp_path / "m") in proc.stdout
    assert "train" in proc.stderr  # the progress bar


@pytest.mark.slow
def test_torchrun_launcher_dry_run_on_two_ranks(subprocess_env):
    env = dict(subprocess_env, PYTHON=PYTHON)
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--nproc", "2", "--dry-run", "model=small"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("dry run OK") == 1  # rank 0 only
    assert "micro-batch 16 x grad_accum 1 x world 2" in proc.stdout


def test_multi_node_launch_without_rendezvous_is_refused(subprocess_env):
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--nnodes", "2"], capture_output=True,
                          text=True, timeout=60, env={k: v for k, v in subprocess_env.items()
                                                      if k not in ("MASTER_ADDR", "RDZV_ENDPOINT")})
    assert proc.returncode == 2 and "needs a rendezvous endpoint" in proc.stderr


_ENDS = """
import atexit, sys
from tierflow.trainer.distributed import end_process, init_runtime, shutdown_runtime
if sys.argv[2] == "group":
    shutdown_runtime(init_runtime("cpu", group=True))
atexit.register(lambda: open(sys.argv[1], "w").write("exit handlers ran"))
class Finalized:
    def __del__(self):
        print(" and a destructor", end="")
keep = Finalized()
print("last line", end="")
try:
    end_process(3, held_group=True if sys.argv[2] == "told" else None)
except SystemExit as exc:
    print(f" then SystemExit({exc.code})", end="")
    raise
"""


@pytest.mark.parametrize("held", ["group", "told", "none"])
def test_a_process_ends_with_its_code_its_output_and_its_exit_handlers(tmp_path, subprocess_env, held):
    """Note [a finished rank exits without destructors]: once a process held a process group it
    leaves without finalizing the interpreter (no destructor runs, nothing raises), as it does when
    told it held one (a script that started its group itself), else as usual."""
    marker = tmp_path / "atexit"
    proc = subprocess.run([PYTHON, "-c", _ENDS, str(marker), held], capture_output=True, text=True, timeout=120,
                          env=subprocess_env)
    assert proc.returncode == 3, proc.stderr
    assert marker.read_text() == "exit handlers ran"
    if held in ("group", "told"):
        assert proc.stdout == "last line"
    else:
        assert proc.stdout.startswith("last line then SystemExit(3)")
