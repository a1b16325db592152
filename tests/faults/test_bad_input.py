"""Issue 15 items 9-11, end to end: each bad input a user can hand ``tierflow train`` gives one
line naming the file or key and what to do, exit code 2, and no run directory: nothing ran.

(The units behind them are tested where they live: hardware files in test_offload_hardware.py,
token files in test_data.py, settings in test_config.py; this is the user's view of all of them.)
"""

import os

import numpy as np
import pytest

from tierflow.trainer import cli


def _hardware(content: bytes):
    def make(tmp_path):
        path = tmp_path / "hw.json"
        path.write_bytes(content)
        return [f"tiers.hardware_file={path}"], str(path)
    return make


def _nvme_dir(kind: str):
    def make(tmp_path):
        path = tmp_path / "ssd"
        if kind == "file":
            path.write_text("not a directory")
        return ["tiers.nvme.enabled=true", f"tiers.nvme.dirs=[{path}]"], f"tiers.nvme.dirs[0]={path}"
    return make


def _tokens_over_vocab(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(600, dtype=np.uint16).tofile(path)  # ids up to 599 with a vocabulary of 256
    return ["data=tokens", f"data.path={path}", "data.vocab_size=256"], "data.vocab_size=256"


def _setting(*overrides, named):
    return lambda tmp_path: (list(overrides), named)


CASES = {
    "hardware file with wrong JSON types": _hardware(b'{"links":"x","tiers":3}'),
    "hardware file that is not UTF-8": _hardware(b"\xff\xfe{"),
    "hardware file that is not JSON": _hardware(b"{links: [}"),
    "nvme dir that does not exist": _nvme_dir("missing"),
    "nvme dir that is a file": _nvme_dir("file"),
    "token ids >= data.vocab_size": _tokens_over_vocab,
    "budget fraction of zero": _setting("offload.device_budget_fraction=0", named="offload.device_budget_fraction"),
    "negative byte budget": _setting("offload.device_budget_bytes=-5", named="offload.device_budget_bytes"),
    "batch the micro-batches do not divide": _setting("trainer.global_batch=10", "trainer.grad_accum=4",
                                                      named="trainer.global_batch=10"),
    "unknown model": _setting("model=nope", named="model"),
    "model target that does not import": _setting("model._target_=nopkg.Nope", named="nopkg"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_before_any_work(case, tmp_path, capsys):
    overrides, named = CASES[case](tmp_path)
    runs = tmp_path / "runs"
    code = cli.main(["train", "logging=none", "logging.progress=false", f"logging.run_root={runs}",
                     "trainer.steps=2", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("tierflow: error: ") and named in err[0], err
    assert "Traceback" not in err[0]
    assert not runs.exists()  # refused before the run directory, the process group or any step


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory: nothing to refuse")
def test_a_read_only_nvme_dir_is_refused_before_any_work(tmp_path, capsys):
    ssd = tmp_path / "ssd"
    ssd.mkdir(mode=0o500)
    runs = tmp_path / "runs"
    code = cli.main(["train", "logging=none", f"logging.run_root={runs}", "tiers.nvme.enabled=true",
                     f"tiers.nvme.dirs=[{ssd}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not writable" in err[0] and not runs.exists()
