"""Issue 15 item 14: what runs leave behind. A run killed with SIGKILL left wandb's temp directories
in the temp dir, every torchrun a ``torchelastic_*`` tree, and a too-long ``store_dir`` was made
before it was refused. Now temp directories go into a per-process scratch directory that the
process removes at exit and the next run removes when the process was killed
(Note [whose scratch directory] in trainer/_scratch.py)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO
from tierflow.trainer._scratch import _make, remove_stale_scratch
from tierflow.trainer.checkpoint.store import StoreError, prepare_store_dir, store_dir_problem
from tierflow.trainer.compose import load_config
from tierflow.trainer.config import ConfigError
from tierflow.trainer.train import train

SMALL = ["offload=none", "logging.progress=false", "logging.plot=false", "trainer.eval_every=0",
         "trainer.eval_batches=1"]
LEFTOVERS = ("*wandb-media", "*wandb-artifacts", "torchelastic_*", "tierflow-tmp-*")


def _leftovers(tmpdir: Path):
    """Our kinds of temp directory under ``tmpdir``. wandb's service makes and removes its own
    ``wandb-*`` directories there while we look: a walk that loses one looks again."""
    for _ in range(20):
        try:
            return sorted(str(p.relative_to(tmpdir)) for pattern in LEFTOVERS for p in tmpdir.rglob(pattern))
        except FileNotFoundError:
            time.sleep(0.05)
    raise AssertionError(f"{tmpdir} kept changing under 20 walks")


def _env(subprocess_env, tmpdir: Path):
    tmpdir.mkdir()
    return dict(subprocess_env, TMPDIR=str(tmpdir))


def test_a_killed_run_leaves_nothing_once_the_next_run_is_done(tmp_path, subprocess_env):
    tmpdir = tmp_path / "tmp"
    env = _env(subprocess_env, tmpdir)
    run = [PYTHON, "-m", "tierflow.trainer.train", *SMALL, f"logging.run_root={tmp_path / 'runs'}"]
    killed = subprocess.Popen(run + ["trainer.steps=1000", "logging.run_name=killed"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run logged no step within 120 s"
        time.sleep(0.2)
    # wandb (offline) made its temp directories inside the run's scratch directory.
    during = _leftovers(tmpdir)
    assert any("wandb-media" in p for p in during) and all(p.startswith("tierflow-tmp-") for p in during), during
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert _leftovers(tmpdir), "a SIGKILLed run should have left its scratch directory (else this test shows nothing)"
    # The next run removes it at its start (without wandb: that it removes its own at exit is shown
    # by the torchrun test, whose worker logs to wandb).
    done = subprocess.run(run + ["trainer.steps=2", "logging=none", "logging.run_name=next"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _leftovers(tmpdir) == []


def test_stale_scratch_is_removed_only_when_its_process_is_gone(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    fd, live, live_lock = _make(root, root.lstat(), "run")  # held, as by a live process
    dead, dead_lock = root / "run-1-dead", root / "run-1-dead.lock"  # its process was SIGKILLed
    (dead / "tmpxwandb-media").mkdir(parents=True)
    dead_lock.touch()
    unmarked = root / "tmpy-no-lock"  # not made by the protocol: never ours to remove
    unmarked.mkdir()
    (live / "tmpzwandb-media").mkdir()
    assert remove_stale_scratch(root) == 1
    assert not dead.exists() and not dead_lock.exists()
    assert live.exists() and live_lock.exists() and unmarked.exists()
    os.close(fd)  # the process dies: the kernel drops its lock
    assert remove_stale_scratch(root) == 1
    assert sorted(p.name for p in root.iterdir()) == [unmarked.name]


@pytest.mark.parametrize("extra", [0, 1])
def test_store_dir_socket_length_limit_is_exact(extra):
    # /<99 bytes>/n.sock is 107 bytes, the most sun_path holds (108 with the terminating NUL).
    path = Path("/" + "d" * (99 + extra))
    assert (store_dir_problem(path, "n") is None) == (extra == 0)
    assert store_dir_problem(path) is not None  # without the node: room for the longest node id (64)
    assert store_dir_problem(Path("/" + "d" * 36)) is None


def test_too_long_store_dir_is_refused_and_not_made(tmp_path, quiet):
    long = tmp_path / "store" / ("s" * 120)
    with pytest.raises(StoreError, match="too long for a Unix socket path"):
        prepare_store_dir(long, "n")
    cfg, _ = load_config(quiet + ["checkpoint=memory", f"checkpoint.store_dir={long}", "trainer.steps=2"])
    with pytest.raises(ConfigError, match=r"too long for a Unix socket path.*set checkpoint\.store_dir"):
        train(cfg)
    assert not (tmp_path / "store").exists()


@pytest.mark.slow  # one torchrun launch: about 20 s
def test_torchrun_leaves_no_torchelastic_dir_nor_wandb_dirs(tmp_path, subprocess_env):
    tmpdir = tmp_path / "tmp"
    env = _env(subprocess_env, tmpdir)
    env["PYTHON"] = PYTHON
    done = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--nproc", "1", "trainer.steps=2", *SMALL,
                           f"logging.run_root={tmp_path / 'runs'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _leftovers(tmpdir) == []
