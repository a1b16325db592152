#!/usr/bin/env python3
"""torchrun, as launch/torchrun.sh runs it: an error a restart cannot fix is printed once, exit code 2.

    python launch/_torchrun.py [torchrun arguments] -m tierflow.trainer.train [overrides...]

The workers write such an error to the file named in ``$TIERFLOW_FATAL_FILE`` instead of failing,
so torchrun's agent does not restart them (Note [errors a restart cannot fix] in trainer/cli.py).
torchrun runs in this process rather than under a shell that waits for it, so a signal sent to the
launcher (SIGTERM from a scheduler, Ctrl-C) reaches torchrun's agent exactly as before.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

FATAL_FILE_ENV = "TIERFLOW_FATAL_FILE"  # the name tierflow.trainer.cli reads


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from tierflow.trainer.torchrun import agent_temp_files

    # torchrun's log tree (a torchelastic_* tree it never removes) and this directory go into the
    # agent's scratch directory: removed at exit, or by the next tierflow process if this one is
    # killed (Note [whose scratch directory] in trainer/_scratch.py).
    with agent_temp_files(), tempfile.TemporaryDirectory(prefix="tierflow-run-") as owner_only:  # 0700, removed after
        fatal = Path(owner_only) / "error"
        os.environ[FATAL_FILE_ENV] = str(fatal)  # the workers inherit the agent's environment
        try:
            torchrun(list(sys.argv[1:] if argv is None else argv))
        except ChildFailedError:
            if not fatal.exists():  # a failure a restart may fix: torchrun's report, as always
                raise
        if fatal.exists():
            print(fatal.read_text().strip(), file=sys.stderr, flush=True)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
