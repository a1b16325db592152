"""Issue 15, item 12: an error a restart cannot fix is printed once and not restarted, exit code 2.

Under torchrun a wrong setting used to be printed once per rank, restarted --max-restarts times and
followed by torchrun's ChildFailedError traceback; the Ray launcher restarted it the same way.
Note [errors a restart cannot fix] in trainer/cli.py.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tierflow.offload import TierFullError, TierIOError
from tierflow.trainer import cli

_spec = importlib.util.spec_from_file_location("ray_launch", REPO / "launch" / "ray_launch.py")
ray_launch = importlib.util.module_from_spec(_spec)
sys.modules["ray_launch"] = ray_launch  # dataclasses look their module up while the class is built
_spec.loader.exec_module(ray_launch)

QUIET = ["logging=none", "logging.progress=false", "logging.plot=false", "offload=none", "trainer.eval_every=0"]
BATCH_3_ON_2_RANKS = "world size 2 does not divide trainer.global_batch/trainer.grad_accum=3/1=3"


def _torchrun_sh(args, env, tmp_path, timeout=180):
    """torchrun.sh on 2 ranks with 3 restarts; its temporary directory under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--nproc", "2", "--max-restarts", "3",
                           *QUIET, *args], cwd=REPO, env={**env, "TMPDIR": str(tmp_path / "tmp")},
                          capture_output=True, text=True, timeout=timeout)
    assert not list((tmp_path / "tmp").glob("tierflow-run-*")), "the launcher left its directory behind"
    return proc


def _assert_reported_once(proc, line):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count(line) == 1, out[-3000:]
    assert "ChildFailedError" not in out and "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_a_setting_wrong_on_every_rank_is_printed_once_and_not_restarted(subprocess_env, tmp_path):
    # The batch split is checked by the ranks themselves (it needs the world size), before they talk.
    proc = _torchrun_sh(["trainer.global_batch=3", f"logging.run_root={tmp_path / 'runs'}"], subprocess_env, tmp_path)
    _assert_reported_once(proc, BATCH_3_ON_2_RANKS)
    assert "failed (exitcode" not in proc.stderr  # no rank failed, so torchrun restarted nothing
    assert not (tmp_path / "runs").exists()


def test_a_full_tier_is_recorded_and_exits_2_so_torchrun_stops_the_peers(tmp_path, monkeypatch, capsys):
    # It may be one rank's while the others wait in a collective: exit 2 makes torchrun stop them
    # at once, and the ranks of its restart find the line and exit 0 (test_a_rank_of_a_later_attempt...).
    commands_train = importlib.import_module("tierflow.trainer.commands.train")

    def run(args):
        raise TierFullError("the host tier holds 0 of 1 bytes; raise tiers.host.budget_bytes")

    monkeypatch.setattr(commands_train, "run", run)
    fatal = tmp_path / "error"
    monkeypatch.setenv(cli.FATAL_FILE_ENV, str(fatal))
    assert cli.main(["train"]) == 2
    assert fatal.read_text() == "tierflow: error: TierFullError: the host tier holds 0 of 1 bytes; " \
                                "raise tiers.host.budget_bytes\n"
    assert capsys.readouterr().err == ""


def test_the_launcher_prints_the_recorded_line_instead_of_torchruns_traceback(monkeypatch, capsys):
    """With --max-restarts 0, a rank that exited 2 fails torchrun: the line replaces its report."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    spec = importlib.util.spec_from_file_location("_torchrun", REPO / "launch" / "_torchrun.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    seen = []

    def torchrun(argv):
        seen.append(argv)
        with open(os.environ[launcher.FATAL_FILE_ENV], "x") as f:
            f.write("tierflow: error: TierFullError: the host tier is full\n")
        raise ChildFailedError("tierflow.trainer.train", {0: ProcessFailure(0, 1, 2, "<N/A>")})

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    monkeypatch.setenv(launcher.FATAL_FILE_ENV, "")  # the launcher sets it: restored after the test
    assert launcher.main(["--nproc_per_node", "2", "-m", "tierflow.trainer.train"]) == 2
    assert seen == [["--nproc_per_node", "2", "-m", "tierflow.trainer.train"]]
    assert capsys.readouterr().err == "tierflow: error: TierFullError: the host tier is full\n"
    assert not os.path.exists(os.environ[launcher.FATAL_FILE_ENV])  # its directory is removed


# ---- the worker side, in this process ----

def test_under_the_launcher_a_rank_records_a_wrong_setting_and_exits_0_silently(tmp_path, monkeypatch, capsys):
    fatal = tmp_path / "error"
    monkeypatch.setenv(cli.FATAL_FILE_ENV, str(fatal))
    assert cli.main(["train", "trainer.steps=-1"]) == 0
    line = fatal.read_text()
    assert "trainer.steps=-1 must be > 0" in line and line.count("\n") == 1
    assert oct(fatal.stat().st_mode & 0o777) == oct(0o600)
    assert cli.main(["train", "trainer.steps=-1"]) == 0  # a second rank: the first line stays
    assert fatal.read_text() == line
    assert capsys.readouterr().err == ""


def test_a_rank_of_a_later_attempt_exits_at_once(tmp_path, monkeypatch):
    fatal = tmp_path / "error"
    fatal.write_text("tierflow: error: recorded by an earlier attempt\n")
    monkeypatch.setenv(cli.FATAL_FILE_ENV, str(fatal))
    monkeypatch.setattr(cli, "_parser", lambda argv: pytest.fail("the command ran"))
    assert cli.main(["train"]) == 0


def test_an_error_a_restart_may_fix_is_not_recorded(tmp_path, monkeypatch, capsys):
    fatal = tmp_path / "error"
    monkeypatch.setenv(cli.FATAL_FILE_ENV, str(fatal))
    failure = cli.failure_of(TierIOError("write to /swap failed: No space left on device"))
    assert failure.restart_can_fix and cli._report(failure) == 1
    assert not fatal.exists() and "No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("local_rank, printed", [("0", True), ("1", False)])
def test_under_plain_torchrun_local_rank_0_alone_prints_a_wrong_setting(local_rank, printed, monkeypatch, capsys):
    monkeypatch.delenv(cli.FATAL_FILE_ENV, raising=False)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert cli.main(["train", "trainer.steps=-1"]) == 2  # torchrun restarts it: the exit code still says why
    assert ("trainer.steps=-1 must be > 0" in capsys.readouterr().err) == printed


# ---- the Ray launcher ----

class _FakeRay:
    """Just enough of ray for _run_group and _attempts: a "ref" is a call made when it is got."""

    class exceptions:
        class RayActorError(Exception):
            pass

        RayTaskError = RayActorError

    @staticmethod
    def get(refs):
        return [r() for r in refs] if isinstance(refs, list) else refs()

    @staticmethod
    def wait(pending, num_returns=1):
        return pending[:num_returns], pending[num_returns:]


class _LocalWorker:
    """A ray_launch._Worker called in this process, its methods behind ``.remote``."""

    def __init__(self, monkeypatch):
        worker = ray_launch._Worker()

        def train(env, overrides):
            for k in env:  # train() sets the rank's environment; undo it after the test
                monkeypatch.setenv(k, os.environ.get(k, ""))
            return worker.train(env, overrides)

        self.where = type("M", (), {"remote": staticmethod(
            lambda: lambda: {"node_id": "n0", "ip": "127.0.0.1", "free_port": 29400})})()
        self.train = type("M", (), {"remote": staticmethod(lambda env, ov: lambda: train(env, ov))})()


def test_ray_a_worker_failing_for_good_stops_the_launch_without_a_restart(monkeypatch):
    made, killed = [], []

    def make_workers():
        made.append(2)
        return [_LocalWorker(monkeypatch), _LocalWorker(monkeypatch)]

    # data.path is only opened by the workers: the launcher's own check before Ray passes it.
    overrides = [*QUIET, "data=tokens", "data.path=/nonexistent/tokens.bin", "trainer.global_batch=8"]
    with pytest.raises(ray_launch.UnrecoverableError, match="data.path=/nonexistent/tokens.bin does not exist"):
        ray_launch._attempts(_FakeRay, make_workers, overrides, max_restarts=3, kill=killed.append)
    assert made == [2] and len(killed) == 2  # one attempt, its workers stopped


def test_ray_main_prints_the_line_once_and_exits_2(monkeypatch, capsys):
    def launch(cfg, overrides):
        raise ray_launch.UnrecoverableError("tierflow: error: trainer.steps=-1 must be > 0")

    monkeypatch.setattr(ray_launch, "launch", launch)
    assert ray_launch.main(["--workers", "2", "--max-restarts", "3"]) == 2
    assert capsys.readouterr().err.count("trainer.steps=-1 must be > 0") == 1


def test_ray_a_worker_raises_an_error_a_restart_may_fix(monkeypatch):
    """...so that the driver sees a RayTaskError and restarts the group."""
    def train(cfg):
        raise TierIOError("write to /swap failed: No space left on device")

    monkeypatch.setattr(importlib.import_module("tierflow.trainer.train"), "train", train)
    env = {**ray_launch.rank_environment(0, 1, ["n0"], "127.0.0.1", 29400), "TIERFLOW_NODE_IP": "127.0.0.1"}
    with pytest.raises(TierIOError, match="No space left"):
        _LocalWorker(monkeypatch).train.remote(env, QUIET)()


@pytest.mark.slow
def test_a_tier_error_on_one_rank_mid_training_ends_every_rank(subprocess_env, tmp_path):
    """Rank 1 fails inside step 3 while rank 0 waits in the step's all-reduce. It used to hang:
    the failing rank waited in the exit barrier of the process group for a peer that waited for
    it. It now leaves the group at once, rank 0's collective fails, and the launcher reports the
    one line with exit 2, without restarting a failure that would happen again."""
    proc = _torchrun_sh(["model._target_=tests._faults.FullTierOnRankLM", "trainer.steps=6",
                         "trainer.global_batch=4", f"logging.run_root={tmp_path / 'runs'}"],
                        subprocess_env, tmp_path, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("out of room on this rank only") == 1, out[-3000:]
