"""``tierflow plan``: plan offloading for a saved trace, print the prediction, write plan JSON and PNG.

    tierflow plan runs/.../trace.tftrace tiers=h100_sxm_pcie5_2nvme --budget 0.5
    tierflow plan trace.tftrace tiers.hardware_file=hw.json --policy belady --budget 40GiB

The trace and the overrides come first, options after them (argparse reads positionals in one run).

Overrides are the ``tiers`` group's (a preset, or ``tiers.hardware_file`` from ``tierflow
calibrate``), composed from ``conf/tiers`` alone so the command does not depend on the trainer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Tuple

from tierflow.offload.core.units import format_bytes
from tierflow.offload.plan import Budgets, make_plan, plot_plan, simulate, validate_plan
from tierflow.profiling.storage import load_trace
from tierflow.trainer.commands.calibrate import load_tiers_config

__all__ = ["add_arguments", "parse_budget", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", metavar="TRACE", help="a trace.tftrace written by `tierflow profile`")
    parser.add_argument("--policy", default="lifetime",
                        help="lifetime (default), none, all_host, zero_offload, zero_infinity, belady")
    parser.add_argument("--budget", default="1.0", metavar="B",
                        help="device budget: a fraction of the unconstrained peak (0.5, 50%%) or bytes (40GiB, 123456)")
    parser.add_argument("--tier-budget", action="append", default=[], metavar="TIER=SIZE",
                        help="budget of one tier, e.g. host=64GiB (repeat; default: the hardware model's capacity)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write plan.json and plan.png (default: the trace's directory)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="tiers overrides: tiers=h100_sxm_pcie5_2nvme or tiers.hardware_file=hw.json")


def parse_budget(text: str) -> Tuple[str, float]:
    """``('fraction', f)`` for ``0.5``/``50%``, ``('bytes', n)`` for ``40GiB``/``123456``.

    Raises:
        ValueError: naming the accepted spellings.
    """
    t = text.strip().upper()
    try:
        if t.endswith("%"):
            return "fraction", float(t[:-1]) / 100
        scales = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        stripped = t.removesuffix("B").removesuffix("I")
        if stripped[-1:] in scales:
            return "bytes", int(float(stripped[:-1]) * scales[stripped[-1]])
        if "." in t or float(t) <= 1:  # 0.5, 1.0, 1: a fraction; 123456: bytes
            return "fraction", float(t)
        return "bytes", int(t)
    except (ValueError, IndexError):
        raise ValueError(f"budget {text!r} is not valid; pass a fraction of the unconstrained peak (0.5 or 50%) "
                         f"or a size (40GiB, 123456789)") from None


def run(args: argparse.Namespace) -> int:
    trace_path = Path(args.trace)
    kind, value = parse_budget(args.budget)
    tier_bytes: List[Tuple[str, int]] = []
    for item in args.tier_budget:
        name, sep, size = item.partition("=")
        k, v = parse_budget(size) if sep else ("", 0)
        if not sep or k != "bytes":
            raise ValueError(f"--tier-budget {item!r} is not valid; write TIER=SIZE, e.g. host=64GiB")
        tier_bytes.append((name, int(v)))
    budgets = Budgets(device_bytes=int(value) if kind == "bytes" else None,
                      device_fraction=value if kind == "fraction" else None, tier_bytes=tuple(tier_bytes))
    hardware = load_tiers_config(args.overrides).hardware_model()
    if hardware is None and args.policy != "none":
        raise ValueError("no hardware model: pick a preset (tiers=h100_sxm_pcie5_2nvme) or pass "
                         "tiers.hardware_file=hw.json from `tierflow calibrate`")
    out = Path(args.out) if args.out else trace_path.parent
    if out.exists() and not out.is_dir():
        raise FileNotFoundError(f"--out {out} exists and is not a directory; pass a directory")
    trace = load_trace(trace_path)
    plan = make_plan(trace, hardware, budgets, args.policy)
    sim = simulate(trace, plan, hardware)
    problems = validate_plan(plan, trace, hardware)
    budgets_by_tier = {"device": plan.device_budget_bytes, **dict(plan.tier_budgets)}
    print(f"tierflow plan: policy {plan.policy} on {plan.hardware or 'no hardware'}, {len(plan.decisions)} decisions "
          f"({sum(d.action.value == 'swap' for d in plan.decisions)} swaps, {len(plan.recomputed_blocks)} recomputed blocks)")
    print(f"  {'tier':<10} {'peak':>12} {'budget':>12}")
    for tier, peak in sim.peak_bytes:
        print(f"  {tier:<10} {format_bytes(peak):>12} {format_bytes(budgets_by_tier.get(tier, 0)):>12}")
    print(f"  unconstrained peak   {format_bytes(plan.unconstrained_peak_bytes)}")
    print(f"  step time            {sim.step_s * 1e3:.3f} ms predicted vs {sim.compute_s * 1e3:.3f} ms unconstrained "
          f"({sim.slowdown:.4f}x)")
    print(f"  stalls               {len(sim.stalls)} points, {sim.stall_s * 1e3:.3f} ms in total")
    for p, s in sorted(sim.stalls, key=lambda x: -x[1])[:5]:
        print(f"    point {p:>6} {trace.points[p].label:<50} {s * 1e3:.3f} ms")
    for link, nbytes in sim.link_bytes:
        print(f"  link {link:<16} {format_bytes(nbytes)}")
    print(f"  fits                 {'yes' if plan.fits else 'NO'}")
    for line in problems:
        print(f"  problem: {line}")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # only once the plan exists: nothing written on failure
    plan_path = plan.save(out / "plan.json")
    png = plot_plan(trace, plan, out / "plan.png")
    print(f"  plan          {plan_path}")
    print(f"  plot          {png}")
    return 0
