"""``tierflow profile``: trace warm-up iterations of the configured training, write trace and report."""

from __future__ import annotations

import argparse
import os

from tierflow.trainer.compose import load_config
from tierflow.trainer.profile import profile_training

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Counts are parsed here rather than by argparse so that a bad value gives our one-line error.
    parser.add_argument("--iterations", default="3", metavar="N",
                        help="training iterations to trace (default 3; 2 or more also checks that they repeat)")
    parser.add_argument("--warmup", default="1", metavar="W",
                        help="untraced steps before tracing, so lazily created state exists (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra override, e.g. model=small")


def _count(flag: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{flag}={text} is not valid; pass a whole number >= {minimum}, e.g. {flag} 3")
    return value


def run(args: argparse.Namespace) -> int:
    iterations = _count("--iterations", args.iterations, 1)
    warmup = _count("--warmup", args.warmup, 0)

    cfg, _ = load_config(args.overrides)
    result = profile_training(cfg, num_iterations=iterations, num_warmup=warmup)
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary)
        print(f"  trace         {result.trace_path}")
        print(f"  summary       {result.summary_path}")
        if result.plot_path is not None:
            print(f"  plot          {result.plot_path}")
    return 0
