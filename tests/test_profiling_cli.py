"""`tierflow profile` and `tierflow report`: real runs, owner-only outputs, one-line errors."""

import os
import shutil
import stat
import subprocess

import pytest

from tests.conftest import PYTHON
from tierflow.profiling import check_stability, load_trace, save_trace
from tierflow.trainer.cli import main as cli_main
from tierflow.trainer.compose import load_config
from tierflow.trainer.profile import profile_training
from tierflow.trainer.train import train


def _tierflow():
    script = shutil.which("tierflow", path=os.path.dirname(PYTHON))
    if script is None:
        pytest.fail("the tierflow console script is not installed next to this interpreter; run pip install -e .")
    return script


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_profile_then_report_from_the_command_line(tmp_path, subprocess_env):
    run = subprocess.run([_tierflow(), "profile", "--iterations", "2", "logging=none", f"logging.run_root={tmp_path}",
                          "logging.run_name=p", "trainer.global_batch=8"],
                         capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert run.returncode == 0, run.stderr
    run_dir = tmp_path / "p"
    assert _mode(run_dir) == 0o700
    for name in ("trace.tftrace", "profile.txt", "memory.png", "config.yaml"):
        assert _mode(run_dir / name) == 0o600, name
    assert (run_dir / "memory.png").read_bytes()[:4] == b"\x89PNG"
    for field in ("peak", "at the peak", "stability     static: 2 iterations", "active", "top 10 tensors"):
        assert field in run.stdout
    assert "profile" in run.stderr  # the progress bar
    trace = load_trace(run_dir / "trace.tftrace")
    assert trace.num_iterations == 2 and trace.model == "GPT" and trace.optimizer == "AdamW"

    out = tmp_path / "rep"
    rep = subprocess.run([_tierflow(), "report", str(run_dir / "trace.tftrace"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert rep.returncode == 0, rep.stderr
    assert _mode(out) == 0o700 and _mode(out / "profile.txt") == 0o600 and _mode(out / "memory.png") == 0o600
    # The report of a saved trace is the report written at profiling time.
    assert (out / "profile.txt").read_text() == (run_dir / "profile.txt").read_text()


def test_profiling_in_process_trains_exactly_like_the_trainer(quiet):
    overrides = quiet + ["trainer.steps=3", "trainer.grad_accum=2", "trainer.global_batch=8"]
    cfg, _ = load_config(overrides + ["logging.run_name=prof"])
    result = profile_training(cfg, num_iterations=2, num_warmup=1)
    assert len(result.losses) == 3
    plain = train(load_config(overrides + ["logging.run_name=plain"])[0])
    assert result.losses == tuple(plain.losses)  # bit-identical: tracing changes no result
    assert load_trace(result.trace_path) == result.trace
    assert check_stability(result.trace).static
    assert result.plot_path is None  # logging.plot=false
    assert result.summary_path.read_text().startswith("tierflow: lifetime trace of GPT + AdamW")


@pytest.mark.parametrize("argv, message", [
    (["profile", "--iterations", "0"], "--iterations=0 is not valid; pass a whole number >= 1"),
    (["profile", "--iterations", "three"], "--iterations=three is not valid"),
    (["profile", "--warmup", "-1"], "--warmup=-1 is not valid; pass a whole number >= 0"),
    (["report", "/nonexistent/trace.tftrace"], "does not exist; run `tierflow profile` first"),
    (["report", "/nonexistent/trace.tftrace", "--top", "0"], "--top=0 is not valid"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierflow: error: ") and message in err
    assert err.strip().count("\n") == 0


def test_report_refuses_another_format_version(tmp_path, capsys):
    from tests.test_profiling_storage import _rewrite_header, _synthetic

    path = save_trace(_synthetic(10), tmp_path / "t.tftrace")
    _rewrite_header(path, version=99)
    assert cli_main(["report", str(path)]) == 2
    assert "trace format version 99" in capsys.readouterr().err
