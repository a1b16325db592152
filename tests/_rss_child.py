"""Child process for the out-of-core tests: train with ``tierflow train`` arguments and report the
peak RSS the OS measured for the training alone.

Imports come first; then the child records its RSS, resets the kernel's high-water mark
(``/proc/self/clear_refs``: 5) and trains, so ``VmHWM`` afterwards is the peak of the run itself
on top of the interpreter, torch and tierflow. Prints one JSON line.
"""

import json
import os
import sys
from pathlib import Path

import torch  # noqa: F401  (imported before the baseline is taken)

from tierflow.trainer.distributed import end_process
from tierflow.trainer.train import main


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


if __name__ == "__main__":
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    code = main(sys.argv[1:])
    line = json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": _status("VmHWM"), "exit": code})
    print(line)
    if os.environ.get("TIERFLOW_TEST_RSS_DIR"):  # under torchrun: one file per rank
        Path(os.environ["TIERFLOW_TEST_RSS_DIR"], f"rank{os.environ.get('RANK', '0')}.json").write_text(line)
    end_process(code)  # Note [a finished rank exits without destructors]
