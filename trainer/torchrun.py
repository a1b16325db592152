"""torchrun that leaves nothing in the temp dir: ``python -m tierflow.trainer.torchrun [torchrun arguments]``.

torch elastic's agent logs into ``--log-dir``, by default a fresh ``torchelastic_*`` tree in the
system temp dir that it never removes (empty directories unless a worker failed), one per launch.
Under :func:`agent_temp_files` the agent's files go into its tierflow scratch directory instead:
removed when the agent exits, or by the next tierflow process when the agent was killed
(Note [whose scratch directory] in ``trainer/_scratch.py``). A ``--log-dir`` on the command line
is used as given, and kept. The workers' own temp files are not affected: they are other processes.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, List, Optional, Sequence

from torch.distributed.run import main as torchrun_main

from tierflow.trainer._scratch import default_tempdir, process_scratch_dir

__all__ = ["agent_temp_files", "main"]


@contextlib.contextmanager
def agent_temp_files(argv: Sequence[str]) -> Iterator[List[str]]:
    """For a process about to run torchrun's agent: ``argv`` with the agent's log directory in its
    scratch directory, and that directory as :mod:`tempfile`'s default while inside.

    Example:
        >>> with agent_temp_files(sys.argv[1:]) as argv:   # doctest: +SKIP
        ...     torch.distributed.run.main(argv)
    """
    argv = list(argv)
    scratch = process_scratch_dir("torchrun")
    if scratch is not None and not _has_log_dir(argv):
        argv = ["--log-dir", str(scratch / "logs"), *argv]
    with default_tempdir(scratch):  # whatever else the agent makes with tempfile
        yield argv


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``torch.distributed.run`` with ``argv``; its failures propagate as torchrun's own do."""
    with agent_temp_files(sys.argv[1:] if argv is None else argv) as args:
        torchrun_main(args)


def _has_log_dir(argv: List[str]) -> bool:
    """Whether torchrun's own arguments (those before ``-m``/``--module``) name a log directory."""
    own = argv
    for flag in ("-m", "--module"):
        if flag in own:
            own = own[: own.index(flag)]
    return any(a.split("=", 1)[0] in ("--log-dir", "--log_dir") for a in own)


if __name__ == "__main__":
    main()
