"""``tierflow report TRACE_FILE [--out DIR]``: a trace's text summary and memory-timeline PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from tierflow.profiling.report import write_report
from tierflow.profiling.storage import load_trace

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", metavar="TRACE_FILE", help="a trace.tftrace written by `tierflow profile`")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write profile.txt and memory.png (default: the trace's directory)")
    parser.add_argument("--top", default="10", metavar="N", help="tensors to list by bytes x idle time (default 10)")


def run(args: argparse.Namespace) -> int:

    try:
        top = int(args.top)
    except ValueError:
        top = 0
    if top < 1:
        raise ValueError(f"--top={args.top} is not valid; pass a whole number >= 1, e.g. --top 10")
    path = Path(args.trace)
    trace = load_trace(path)
    files = write_report(trace, Path(args.out) if args.out else path.parent, top=top)
    print(files.summary.read_text().rstrip("\n"))
    print(f"  summary       {files.summary}")
    print(f"  plot          {files.plot}")
    return 0
