"""``tierflow calibrate``: measure every storage link and write a HardwareModel JSON.

    tierflow calibrate --out hw.json --nvme-dir /mnt/nvme0/tf --nvme-dir /mnt/nvme1/tf
    tierflow calibrate tiers=h100_sxm_pcie5_2nvme tiers.nvme.dirs=[/mnt/a,/mnt/b] --quick

Overrides are the ``tiers`` group's (``tiers=<preset>`` picks ``conf/tiers/<preset>.yaml``,
``tiers.<key>=<value>`` sets a key); NVMe directories and NUMA nodes come from them unless
``--nvme-dir`` / ``--numa-node`` are given. The config tree is composed here from ``conf/tiers``
alone, so the command does not depend on the trainer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from tierflow.offload.core.errors import TierConfigError, TierError
from tierflow.offload.core.units import format_bytes
from tierflow.offload.tiers.calibrate import CalibrationPlan, calibrate
from tierflow.offload.tiers.config import TiersConfig
from tierflow.trainer.compose import config_dir

__all__ = ["add_arguments", "load_tiers_config", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="hardware.json", metavar="PATH", help="where to write the HardwareModel JSON")
    parser.add_argument("--nvme-dir", action="append", default=None, metavar="DIR",
                        help="an NVMe swap directory to measure (repeat for several; default: tiers.nvme.dirs)")
    parser.add_argument("--numa-node", action="append", type=int, default=None, metavar="N",
                        help="a NUMA node to measure (repeat; default: tiers.numa.nodes, else every node with memory)")
    parser.add_argument("--no-numa", action="store_true", help="skip the NUMA links")
    parser.add_argument("--sizes", default="1M,8M,64M", help="transfer sizes, comma-separated (K, M, G suffixes)")
    parser.add_argument("--concurrency", default="1,2,4", help="transfers in flight, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per size and concurrency")
    parser.add_argument("--quick", action="store_true", help="one small size, concurrency 1 and 2, one round")
    parser.add_argument("--name", default=None, help="label stored in the model (default: host name)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="tiers overrides, e.g. tiers.nvme.dirs=[/mnt/a]")


def run(args: argparse.Namespace) -> int:

    cfg = load_tiers_config(args.overrides)
    if args.quick:
        plan = CalibrationPlan(sizes_bytes=(1 << 20,), concurrency=(1, 2), repeats=1, chunk_bytes=cfg.nvme.chunk_bytes)
    else:
        plan = CalibrationPlan(sizes_bytes=tuple(_parse_size(s) for s in args.sizes.split(",")),
                               concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                               repeats=args.repeats, chunk_bytes=cfg.nvme.chunk_bytes)
    nvme_dirs = args.nvme_dir if args.nvme_dir is not None else list(cfg.nvme.dirs)
    numa_nodes = [] if args.no_numa else (args.numa_node if args.numa_node is not None else (list(cfg.numa.nodes) or None))
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: directory {out.parent} does not exist; create it first")
    print(f"tierflow: calibrating (sizes {', '.join(format_bytes(s) for s in plan.sizes_bytes)}; "
          f"concurrency {', '.join(map(str, plan.concurrency))}; {plan.repeats} repeats)")
    if not nvme_dirs:
        print("  no NVMe directory given: NVMe links not measured (pass --nvme-dir DIR)")
    try:
        model = calibrate(plan, nvme_dirs=nvme_dirs, numa_nodes=numa_nodes, numa_sysfs_root=cfg.numa.sysfs_root,
                          host_budget_bytes=cfg.host.budget_bytes if cfg.host.enabled else None, name=args.name,
                          progress=lambda line: print(line, flush=True))
    except TierError as exc:  # a full disk or a refused mbind: say it in one line, like config errors
        print(f"tierflow: error: {exc}", file=sys.stderr)
        return 2
    model.save(str(out))
    print(f"tierflow: wrote {out} ({len(model.links)} links, {len(model.tiers)} tiers); plan with tiers.hardware_file={out}")
    return 0


def load_tiers_config(overrides: Sequence[str] = ()):
    """Compose the ``tiers`` group from ``conf/tiers`` plus overrides into a validated TiersConfig.

    Args:
        overrides: ``tiers=<preset>`` and ``tiers.<key>=<value>`` strings (Hydra syntax).

    Raises:
        TierConfigError: one line naming every bad override or key.
    """

    root = config_dir() / "tiers"  # the same tree (and TIERFLOW_CONFIG_DIR) as the trainer's
    options = sorted(p.stem for p in root.glob("*.yaml"))
    preset, dotlist, problems = "none", [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"override {item!r} has no '='; write key=value, e.g. tiers.nvme.dirs=[/mnt/nvme0]")
        elif key == "tiers":
            if value not in options:
                problems.append(f"unknown option tiers={value}; valid options for tiers: {', '.join(options)}")
            preset = value
        elif key.startswith("tiers."):
            dotlist.append(f"{key[len('tiers.'):]}={value}")
        else:
            problems.append(f"calibrate takes tiers overrides only; {key!r} is not under tiers")
    if problems:
        raise TierConfigError("; ".join(problems))
    schema = OmegaConf.structured(TiersConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.load(root / f"{preset}.yaml"), OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)
    except TierConfigError:
        raise
    except Exception as exc:  # OmegaConf's errors are multi-line; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TierConfigError(f"tiers: {first}") from None


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ValueError(f"--sizes: {text!r} is not a size; write e.g. 1M,8M,64M") from None


if __name__ == "__main__":  # pragma: no cover - `python -m tierflow.trainer.commands.calibrate`
    parser = argparse.ArgumentParser(prog="python -m tierflow.trainer.commands.calibrate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
