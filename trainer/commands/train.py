"""``tierflow train``: compose the config, then train, dry-run or print it."""

from __future__ import annotations

import argparse
import os
from typing import List

from omegaconf import OmegaConf

from tierflow.trainer.compose import load_config
from tierflow.trainer.train import dry_run, train

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="check config, data and model construction, print the sizes, train nothing")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra override, e.g. trainer.steps=50")


def run(args: argparse.Namespace) -> int:

    cfg, composed = load_config(args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(composed), end="")
        return 0
    if args.dry_run:
        report = dry_run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(_format_dry_run(report))
        return 0

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
