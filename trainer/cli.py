"""The ``tierflow`` command: one subcommand per pipeline stage, each taking Hydra overrides.

    tierflow train [--dry-run] [--print-config] [overrides...]

Later stages (profile, plan, calibrate, report, bench) register here as they land.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from trainer.config import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierflow",
        description="Train PyTorch models whose training state does not fit in accelerator memory.",
        epilog="Overrides are Hydra syntax: model=small trainer.steps=50 +model.kwargs.hidden=64",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train a model (also: python -m trainer.train, under torchrun too)")
    train.add_argument("--dry-run", action="store_true",
                       help="check config, data and model construction, print the sizes, train nothing")
    train.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    train.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra override, e.g. trainer.steps=50")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _train(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"tierflow: error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from trainer.compose import load_config

    cfg, composed = load_config(args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(composed), end="")
        return 0
    if args.dry_run:
        from trainer.train import dry_run

        report = dry_run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(_format_dry_run(report))
        return 0
    from trainer.train import train

    train(cfg)
    return 0


def _format_dry_run(r: dict) -> str:
    lines: List[str] = [
        "tierflow: dry run OK (nothing trained, nothing written)",
        f"  model            {r['model']}: {r['parameters']:,} parameters ({r['param_bytes'] / 2**20:,.1f} MiB)",
        f"  training state   {r['training_state_bytes'] / 2**30:,.2f} GiB (weights, grads, optimizer states)",
        f"  batch            {r['tokens_per_step']:,} tokens/step = micro-batch {r['micro_batch']} x "
        f"grad_accum {r['grad_accum']} x world {r['world_size']}",
        f"  data             {r['data']}",
    ]
    return "\n".join(lines)
