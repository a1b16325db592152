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
from typing import Optional, Sequence

from tierflow.offload import BudgetExceededError, TierError, TierIOError
from tierflow.trainer.checkpoint.persist import CheckpointCorruptError
from tierflow.trainer.checkpoint.store import StoreError
from tierflow.trainer.config import ConfigError

__all__ = ["SUBCOMMANDS", "main"]

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args))
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"tierflow: error: {exc}", file=sys.stderr)
        return 2
    except (TierError, BudgetExceededError, CheckpointCorruptError, StoreError) as exc:
        # A tier that is full or failed, a budget the run cannot keep: one paragraph that says what
        # to change, not a traceback through the runtime (TIERFLOW_TRACEBACK=1 shows it).
        if os.environ.get("TIERFLOW_TRACEBACK"):
            raise
        print(f"tierflow: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, TierIOError) else 2  # an I/O error may pass; a full tier will not
    except BrokenPipeError:  # e.g. `tierflow train --print-config | head`
        sys.stdout = open(os.devnull, "w")
        return 0
