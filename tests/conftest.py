import os
import sys
from pathlib import Path
from typing import List

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def quiet(tmp_path) -> List[str]:
    """Overrides for a fast, silent run that writes only under tmp_path."""
    # offload=none: the default config offloads; tests of other features run without it.
    return ["logging=none", "logging.progress=false", "logging.plot=false",
            f"logging.run_root={tmp_path / 'runs'}", "trainer.eval_every=0", "trainer.eval_batches=1", "offload=none"]


@pytest.fixture
def subprocess_env(tmp_path):
    """Environment for child processes: repo importable, wandb offline, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "offline"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


PYTHON = sys.executable


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on now, for a child process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def snapshot_store_dir():
    """A short owner-only store directory for checkpoint tests; afterwards every snapshot store
    started in it is stopped, and no store process or /dev/shm segment of it may be left."""
    import shutil
    import tempfile

    from tierflow.trainer.checkpoint.store import list_stores, segment_prefix, stop_store

    path = Path(tempfile.mkdtemp(prefix="tfst-", dir="/tmp"))
    yield path
    for info in list_stores(path):
        stop_store(path, info["node"])
    ns = segment_prefix(path, "x").rsplit("-", 2)[0] + "-"
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith(ns)]
    for n in leaked:
        os.unlink(os.path.join("/dev/shm", n))
    pids = list(path.glob("*.pid"))
    shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"snapshot segments leaked: {leaked}"
    assert not pids, f"snapshot stores still running: {pids}"
