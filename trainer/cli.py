"""The ``tierflow`` command: one subcommand per pipeline stage, each taking Hydra overrides.

    tierflow train [--dry-run] [--print-config] [overrides...]

A subcommand is a module listed in :data:`SUBCOMMANDS` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when invoked, so a slow
or optional dependency of one stage never slows down another.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import NoReturn, Optional, Sequence

from tierflow.offload import BudgetExceededError, TierError, TierIOError
from tierflow.trainer.checkpoint.persist import CheckpointCorruptError
from tierflow.trainer.checkpoint.store import StoreError
from tierflow.trainer.config import ConfigError
from tierflow.trainer.distributed import end_process, exit_if_left_failed

__all__ = ["FATAL_FILE_ENV", "SUBCOMMANDS", "Failure", "console", "failure_of", "main"]

# name -> (module, one-line help). Add later stages (profile, plan, calibrate, report, bench) here.
SUBCOMMANDS = {
    "train": ("tierflow.trainer.commands.train", "train a model (also: python -m tierflow.trainer.train, under torchrun too)"),
    "profile": ("tierflow.trainer.commands.profile", "trace tensor lifetimes over warm-up iterations; write trace, summary, plot"),
    "report": ("tierflow.trainer.commands.report", "summarise a trace file: text summary and memory-timeline PNG"),
    "calibrate": ("tierflow.trainer.commands.calibrate", "measure every storage link and write a HardwareModel JSON"),
    "plan": ("tierflow.trainer.commands.plan", "plan offloading for a trace: predicted step time, plan JSON, memory PNG"),
}


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierflow",
        description="Train PyTorch models whose training state does not fit in accelerator memory.",
        epilog="Overrides are Hydra syntax: model=small trainer.steps=50 +model.kwargs.hidden=64",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the invoked stage's module is imported
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


# Note [errors a restart cannot fix]
# torchrun's agent restarts the whole group when any worker fails, whatever its exit code, and ends
# with a ChildFailedError traceback: a wrong setting was printed once per rank, --max-restarts times
# over. launch/torchrun.sh names a file in an owner-only directory in $TIERFLOW_FATAL_FILE; a rank
# that fails in a way no restart can fix writes its line there (the first writer wins) and prints
# nothing. A configuration error is the same on every rank and comes before the ranks talk, so
# every rank exits 0: the agent neither restarts nor reports anything. Any other such error (a full
# tier, a budget the run cannot keep) may be one rank's while its peers wait in a collective, so
# that rank exits 2 and the agent stops the peers at once. Ranks of a later attempt find the line
# and exit 0 at once. The launcher prints the line once and exits 2. Under plain torchrun only
# local rank 0 prints a configuration error.
FATAL_FILE_ENV = "TIERFLOW_FATAL_FILE"
#: Seconds a rank other than local rank 0 waits before leaving on an error every rank sees
#: (Note [rank 0 speaks first]).
QUIET_RANK_DELAY_S = 5.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _failure_recorded():  # Note [errors a restart cannot fix]: an earlier attempt failed for good
        return 0
    args = _parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args))
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as exc:
        return exit_if_left_failed(_report(failure_of(exc)))
    except (TierError, BudgetExceededError, CheckpointCorruptError, StoreError) as exc:
        if os.environ.get("TIERFLOW_TRACEBACK"):
            raise
        return exit_if_left_failed(_report(failure_of(exc)))
    except BrokenPipeError:  # e.g. `tierflow train --print-config | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except BaseException:  # a bug or an interrupt: its traceback, then out (Note [a failed rank exits ...])
        exit_if_left_failed(1, show_traceback=True)
        raise


def console() -> NoReturn:
    """The ``tierflow`` console script: :func:`main`, then out through
    :func:`~tierflow.trainer.distributed.end_process` (Note [a finished rank exits without destructors])."""
    end_process(main())


@dataclass(frozen=True)
class Failure:
    """An error a command reports as one line instead of a traceback.

    Attributes:
        message: the line to print, ``tierflow: error: ...``.
        exit_code: 2 when running again cannot fix it (a wrong setting, a full tier, a budget the
            run cannot keep); 1 when it may pass (an I/O error).
        same_on_every_rank: a configuration error: every rank of a node fails with the same line,
            before the ranks talk to each other (one of them prints it).
    """

    message: str
    exit_code: int
    same_on_every_rank: bool

    @property
    def restart_can_fix(self) -> bool:
        return self.exit_code != 2


def failure_of(exc: BaseException) -> Optional[Failure]:
    """The one-line report of ``exc``, or None for an error that deserves its traceback.

    Example:
        >>> failure_of(ConfigError("trainer.steps=-1 must be > 0")).exit_code
        2
    """
    if isinstance(exc, (ValueError, FileNotFoundError, FloatingPointError)):  # ConfigError is a ValueError
        return Failure(f"tierflow: error: {exc}", 2, same_on_every_rank=isinstance(exc, ConfigError))
    if isinstance(exc, (TierError, BudgetExceededError, CheckpointCorruptError, StoreError)):
        # A tier that is full or failed, a budget the run cannot keep: one paragraph that says what
        # to change, not a traceback through the runtime (TIERFLOW_TRACEBACK=1 shows it).
        return Failure(f"tierflow: error: {type(exc).__name__}: {exc}",
                       1 if _may_pass(exc) else 2,  # an I/O error may pass (a restart resumes); a full tier will not
                       same_on_every_rank=False)
    return None


def _failure_recorded() -> bool:
    path = os.environ.get(FATAL_FILE_ENV)
    return bool(path) and os.path.exists(path)


def _record(message: str) -> bool:
    """Write ``message`` to the launcher's file unless a rank did first; False without a launcher."""
    path = os.environ.get(FATAL_FILE_ENV)
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return True  # another rank's line is there: one is enough
    except OSError:
        return False  # the launcher's directory is gone or not ours to write: report it here
    with os.fdopen(fd, "w") as f:
        f.write(message + "\n")
    return True


def _report(failure: Failure) -> int:
    """Print ``failure`` (or hand it to the launcher) and return the exit code."""
    if not failure.restart_can_fix and _record(failure.message):  # Note [errors a restart cannot fix]
        return 0 if failure.same_on_every_rank else failure.exit_code
    if not failure.same_on_every_rank or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(failure.message, file=sys.stderr)
    else:
        # Note [rank 0 speaks first]: under plain torchrun the agent stops every worker as soon as
        # one exits with an error; a quiet rank leaving first could kill local rank 0 before it
        # printed the one line (seen in CI). It leaves a few seconds after, on this failure only.
        time.sleep(QUIET_RANK_DELAY_S)
    return failure.exit_code


def _may_pass(exc: Optional[BaseException]) -> bool:
    """An I/O error, or an error caused by one (a tiered step that failed on a read): a restart may cure it."""
    while exc is not None:
        if isinstance(exc, TierIOError):
            return True
        exc = exc.__cause__
    return False
