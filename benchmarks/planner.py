"""Offload policies x device budgets on traces of the built-in GPT, with the H100 preset.

    python benchmarks/planner.py [--models tiny,small,medium] [--traces a.tftrace ...] [--compute-scale 1.0]

1. Profiles one iteration of each built-in GPT size on this machine (``tierflow profile``), unless
   ``--traces`` gives saved traces.
2. For every policy and every device budget (100%, 70%, 50%, 30% of the unconstrained peak),
   plans with the ``h100_sxm_pcie5_2nvme`` HardwareModel and prints the predicted step time
   relative to the unconstrained one and whether the plan fits (``-`` when the budget is below
   the feasible minimum, which is printed).
3. Prints how far ``lifetime`` is from ``ilp`` wherever ilp solves, and the time to plan a
   synthetic trace of 100k tensors with ``lifetime``.

``--compute-scale`` multiplies every measured compute time (e.g. 0.01 to pretend the CPU-measured
iteration ran ~100x faster, closer to the H100 the links belong to). Not run by CI.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tierflow.offload.plan import POLICIES, Budgets, make_plan  # noqa: E402
from tierflow.profiling import load_trace  # noqa: E402
from tierflow.profiling.trace import Category, LifetimeTrace, Phase, Point, PointKind, TensorRecord  # noqa: E402
from tierflow.trainer.commands.calibrate import load_tiers_config  # noqa: E402

BUDGETS = (1.0, 0.7, 0.5, 0.3)
PRESET = "h100_sxm_pcie5_2nvme"


def profile(model: str, root: str) -> str:
    cmd = [sys.executable, "-c", "import sys; from tierflow.trainer.cli import main; sys.exit(main())", "profile", "--iterations", "1", f"model={model}",
           f"logging.run_root={root}/{model}", "logging.backend=none"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return sorted(glob.glob(f"{root}/{model}/*/trace.tftrace"))[-1]


def scaled(trace: LifetimeTrace, factor: float) -> LifetimeTrace:
    if factor == 1.0:
        return trace
    return replace(trace, points=tuple(replace(p, compute_s=p.compute_s * factor) for p in trace.points))


def synthetic_trace(num_tensors: int = 100_000, num_layers: int = 500) -> LifetimeTrace:
    """A GPT-like iteration: per layer a forward and a backward point, activations saved in the
    forward and used in the backward, parameters and two optimizer states per layer."""
    pts: List[Point] = []

    def point(kind: PointKind, name: str, phase: Phase) -> int:
        pts.append(Point(kind, name, 0, 0, phase, 1e-3, 1000 * len(pts)))
        return len(pts) - 1

    point(PointKind.ITERATION_START, "iteration", Phase.FORWARD)
    fwd = [point(PointKind.FORWARD_PRE, f"l{i}", Phase.FORWARD) for i in range(num_layers)]
    bwd = [point(PointKind.BACKWARD_PRE, f"l{i}", Phase.BACKWARD) for i in reversed(range(num_layers))][::-1]
    opt = point(PointKind.OPTIMIZER_PRE, "Adam", Phase.OPTIMIZER)
    point(PointKind.OPTIMIZER_POST, "Adam", Phase.OTHER)
    point(PointKind.ITERATION_END, "iteration", Phase.OTHER)
    recs: List[TensorRecord] = []
    per_layer = num_tensors // num_layers
    for i in range(num_layers):
        for k in range(3):
            uses = (fwd[i], bwd[i], opt) if k == 0 else (opt,)
            recs.append(TensorRecord(f"l{i}.w{k}", Category.PARAM if k == 0 else Category.OPTIMIZER_STATE,
                                     1 << 18, "float32", "cuda:0", None, None, None, uses, -1, None))
        for k in range(per_layer - 3):
            c, f = fwd[i], bwd[i]
            recs.append(TensorRecord(f"l{i}[0]:saved{k}", Category.ACTIVATION, (1 + (k * 7919) % 16) << 12, "float32",
                                     "cuda:0", 0, c, f, (c, f), 1000 * c + 1 + k, 1000 * f + 1 + k))
    return LifetimeTrace(points=tuple(pts), tensors=tuple(recs), num_iterations=1, model="Synthetic")


def cell(trace, hw, policy: str, fraction: float) -> Dict[str, object]:
    try:
        plan = make_plan(trace, hw, Budgets(device_fraction=fraction), policy)
    except ValueError as exc:
        return {"text": "-", "error": str(exc)}
    return {"text": f"{plan.slowdown:.3f} {'fits' if plan.fits else 'OVER'}", "slowdown": plan.slowdown, "fits": plan.fits}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small,medium")
    ap.add_argument("--traces", nargs="*", default=None)
    ap.add_argument("--compute-scale", type=float, default=1.0)
    ap.add_argument("--no-ilp", action="store_true")
    args = ap.parse_args(argv)
    hw = load_tiers_config([f"tiers={PRESET}"]).hardware_model()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"hardware model: {PRESET}; compute scale {args.compute_scale}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.traces or [profile(m, tmp) for m in args.models.split(",")]
        names = [Path(p).parent.name if args.traces else m for p, m in zip(paths, args.models.split(",") * 9)]
        traces = [scaled(load_trace(p), args.compute_scale) for p in paths]
    policies = [p for p in POLICIES if not (args.no_ilp and p == "ilp")]
    goals: List[str] = []
    for name, trace in zip(names, traces):
        print(f"\n## {name}: {len(trace.points)} points, {len(trace.tensors)} tensors, "
              f"{sum(p.compute_s for p in trace.points) * 1e3:.1f} ms compute")
        print("| policy | " + " | ".join(f"{int(f * 100)}%" for f in BUDGETS) + " |")
        print("|---" * (len(BUDGETS) + 1) + "|")
        results = {}
        for policy in policies:
            row = [cell(trace, hw, policy, f) for f in BUDGETS]
            results[policy] = row
            print(f"| {policy} | " + " | ".join(str(c["text"]) for c in row) + " |")
        errors = {str(c.get("error")) for row in results.values() for c in row if "error" in c}
        for e in sorted(errors):
            print(f"  - {e}")
        life = results["lifetime"]
        for i, f in enumerate(BUDGETS):
            if "fits" not in life[i]:
                continue
            for policy in policies:
                other = results[policy][i]
                if policy in ("lifetime", "ilp") or not other.get("fits"):
                    continue
                if other["slowdown"] < life[i]["slowdown"] - 1e-12:
                    goals.append(f"{name} {int(f * 100)}%: {policy} beats lifetime "
                                 f"({other['slowdown']:.4f} vs {life[i]['slowdown']:.4f})")
            ilp = results.get("ilp", [{}] * len(BUDGETS))[i]
            if ilp.get("fits"):
                gap = life[i]["slowdown"] / ilp["slowdown"] - 1
                print(f"  lifetime vs ilp at {int(f * 100)}%: {gap:+.2%}")
    big = synthetic_trace()
    start = time.perf_counter()
    plan = make_plan(big, hw, Budgets(device_fraction=0.5))
    took = time.perf_counter() - start
    print(f"\nsynthetic trace, {len(big.tensors)} tensors, {len(big.points)} points: lifetime planned (incl. "
          f"simulation) in {took:.2f} s; fits={plan.fits}, predicted {plan.slowdown:.3f}x")
    print("\n" + ("\n".join(f"goal missed: {g}" for g in goals) or "lifetime is never beaten by a baseline that fits"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
