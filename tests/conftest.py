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
    return ["logging=none", "logging.progress=false", "logging.plot=false",
            f"logging.run_root={tmp_path / 'runs'}", "trainer.eval_every=0", "trainer.eval_batches=1"]


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
