"""torchrun that leaves nothing in the temp dir: ``python -m tierflow.trainer.torchrun [torchrun arguments]``.

torch elastic's agent logs into ``--log-dir``, by default a fresh ``torchelastic_*`` tree in the
system temp dir that it never removes (empty directories unless a worker failed), one per launch.
Under :func:`agent_temp_files` the agent's files go into its tierflow scratch directory instead:
removed when the agent exits, or by the next tierflow process when the agent was killed
(Note [whose scratch directory] in ``trainer/_scratch.py``). A log directory given with
``--log-dir`` or ``$PET_LOG_DIR`` is used as given, and kept. The workers' own temp files are not
affected: they are other processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from torch.distributed.run import main as torchrun_main

from tierflow.trainer._scratch import default_tempdir, process_scratch_dir

__all__ = ["agent_temp_files", "main"]

_LOG_DIR_ENV = "PET_LOG_DIR"  # torchrun's --log-dir, read from the environment when not given


@contextlib.contextmanager
def agent_temp_files() -> Iterator[Optional[Path]]:
    """For a process about to run torchrun's agent: its log directory (``$PET_LOG_DIR``, torchrun's
    environment form of ``--log-dir``) and :mod:`tempfile`'s default in this process's scratch
    directory while inside. Yields that directory (None when there is none, see
    :func:`~tierflow.trainer._scratch.process_scratch_dir`).

    Example:
        >>> with agent_temp_files():                      # doctest: +SKIP
        ...     torch.distributed.run.main(sys.argv[1:])
    """
    scratch = process_scratch_dir("torchrun")
    chosen = os.environ.get(_LOG_DIR_ENV)  # the user's, like a --log-dir on the command line, wins
    if scratch is not None and chosen is None:
        os.environ[_LOG_DIR_ENV] = str(scratch / "logs")
    try:
        with default_tempdir(scratch):  # whatever else the agent makes with tempfile
            yield scratch
    finally:
        if chosen is None:
            os.environ.pop(_LOG_DIR_ENV, None)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``torch.distributed.run`` with ``argv``; its failures propagate as torchrun's own do."""
    with agent_temp_files():
        torchrun_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
