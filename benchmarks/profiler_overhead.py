"""Profiler overhead, and TERAIO's active fraction, on the built-in GPT.

    python benchmarks/profiler_overhead.py [--models tiny,small,medium] [--rounds 5] [--batch 32]

Per model size three identical runs are built from ``conf/`` (same seed): ``U`` is never traced,
``T`` is traced and then detached, ``V`` is never traced either (the control). Every round times
one step of each run on the same data:

* traced phase: T's step runs inside a fresh tracer's ``iteration()`` (attaching, with its
  calibration, and detaching are outside the timed step);
* detached phase: T's step after all its tracers detached; the goal is 1.00x. ``control`` is V
  over U: the noise floor of two identical untraced runs (the detached ratio means something only
  next to it).

Ratios are medians over rounds of a step's cost over U's in the same round: CPU time of the
stepping thread on CPU (with one intra-op thread that is the step's whole cost, and it does not
grow while the machine is shared with other work), wall time on CUDA. Also printed: the compute
the trace measured between its points over an untraced step's wall time (how faithful the
trace's timings are), the trace's size and peak, the active fraction (window of one point
interval) next to TERAIO's 1.7% per kernel, and the time to load a 100k-tensor trace file.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tierflow.profiling import (  # noqa: E402
    Category,
    LifetimeTrace,
    LifetimeTracer,
    Phase,
    Point,
    PointKind,
    TensorRecord,
    active_fraction,
    check_stability,
    load_trace,
    memory_timeline,
    save_trace,
)
from tierflow.profiling.report import TERAIO_ACTIVE_FRACTION, format_bytes  # noqa: E402
from tierflow.trainer.build import RunParts, build_run  # noqa: E402
from tierflow.trainer.compose import load_config  # noqa: E402
from tierflow.trainer.distributed import init_runtime  # noqa: E402
from tierflow.trainer.model import count_parameters  # noqa: E402
from tierflow.trainer.step import train_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall time on CUDA (the device does the work); this thread's CPU time on CPU.

    On a CPU shared with other work, wall time mostly measures the neighbours; with one intra-op
    thread the calling thread does all of a step's work (CPU autograd runs on it too), so its CPU
    time is the step's cost and does not grow when the scheduler lends the core to someone else.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.read = time.perf_counter if device.type == "cuda" else time.thread_time


def _timed_step(parts: RunParts, step: int, clock: _Clock, tracer: Optional[LifetimeTracer] = None) -> float:
    batches = parts.loader.micro_batches(step)
    _sync(clock.device)
    start = clock.read()
    if tracer is None:
        loss = train_step(parts.wrapped, parts.optimizer, batches, parts.amp_dtype, 1.0)
    else:
        with tracer.iteration():
            tracer.mark_inputs(batches)
            loss = train_step(parts.wrapped, parts.optimizer, batches, parts.amp_dtype, 1.0)
    loss.item()
    _sync(clock.device)
    return clock.read() - start


def _wall_step(parts: RunParts, step: int, device: torch.device) -> float:
    batches = parts.loader.micro_batches(step)
    _sync(device)
    start = time.perf_counter()
    train_step(parts.wrapped, parts.optimizer, batches, parts.amp_dtype, 1.0).item()
    _sync(device)
    return time.perf_counter() - start


def bench_model(model: str, batch: int, rounds: int) -> Dict[str, object]:
    cfg, _ = load_config([f"model={model}", f"trainer.global_batch={batch}", "logging=none"])
    rt = init_runtime(cfg.trainer.device)
    clock = _Clock(rt.device)
    # U: never traced; T: traced, then detached; V: never traced either, the control that shows how
    # far two identical untraced runs differ on this machine at this time (the noise floor).
    untraced, traced, control = build_run(cfg, rt), build_run(cfg, rt), build_run(cfg, rt)
    for step in range(2):  # warm-up: lazy optimizer state, allocator, kernels
        for parts in (untraced, traced, control):
            _timed_step(parts, step, clock)
    traced_ratio, compute_share, detached_ratio, control_ratio = [], [], [], []
    trace: Optional[LifetimeTrace] = None
    for r in range(rounds):
        step = 2 + r
        tracer = LifetimeTracer(traced.model, traced.optimizer)
        u_wall = _wall_step(untraced, step, rt.device) if r % 2 else None
        u = _timed_step(untraced, step, clock)
        tracer.attach()  # U never runs while T's tracer is attached: the dispatch mode is per thread
        t = _timed_step(traced, step, clock, tracer)
        tracer.detach()
        if u_wall is None:
            u_wall = _wall_step(untraced, step, rt.device)
        trace = tracer.trace()
        traced_ratio.append(t / u)
        # The trace measures wall time between its points; compare with an untraced step's wall time.
        compute_share.append(sum(p.compute_s for p in trace.points[1:]) / u_wall)
    for r in range(2 * rounds):
        step = 2 + rounds + r
        trio = [(untraced, "u"), (traced, "t"), (control, "v")]
        got = {key: _timed_step(parts, step, clock) for parts, key in trio[r % 3:] + trio[:r % 3]}
        detached_ratio.append(got["t"] / got["u"])
        control_ratio.append(got["v"] / got["u"])
    # A separate three-iteration trace (untimed) for the stability verdict.
    tracer = LifetimeTracer(traced.model, traced.optimizer)
    with tracer:
        for i in range(3):
            _timed_step(traced, 2 + 3 * rounds + i, clock, tracer)
    stability = check_stability(tracer.trace())
    assert trace is not None
    af = active_fraction(trace)
    med = statistics.median
    return {
        "model": model, "params": count_parameters(traced.model), "device": str(rt.device),
        "untraced_s": med([_timed_step(untraced, 100 + i, clock) for i in range(3)]),
        "traced_ratio": med(traced_ratio), "detached_ratio": med(detached_ratio), "control_ratio": med(control_ratio),
        "compute_share": med(compute_share),
        "tensors": len(trace.tensors), "points": len(trace.points), "peak": memory_timeline(trace).peak.total_bytes,
        "active_mean": af.mean, "active_overall": af.overall, "static": stability.static,
    }


def _synthetic_trace(num_tensors: int, num_points: int = 2000) -> LifetimeTrace:
    points = tuple(Point(PointKind.ITERATION_START if i == 0 else
                         PointKind.ITERATION_END if i == num_points - 1 else PointKind.FORWARD_PRE,
                         f"blocks.{i % 96}.mlp", i // 96, 0, Phase.FORWARD, 1e-4, 10 * num_tensors * i)
                   for i in range(num_points))
    tensors = tuple(TensorRecord(
        key=f"blocks.{j % 96}.attn[{j // 96}]:saved{j % 7}", category=Category.ACTIVATION, size_bytes=4096 + j,
        dtype="bfloat16", device="cuda:0", iteration=0, created=1 + j % 1900, freed=9 + j % 1900,
        uses=(3 + j % 1900, 5 + j % 1900, 8 + j % 1900), created_tick=points[1 + j % 1900].tick + 1 + j,
        freed_tick=points[9 + j % 1900].tick + 1 + j) for j in range(num_tensors))
    return LifetimeTrace(points=points, tensors=tensors, num_iterations=1, model="Synthetic", optimizer="AdamW")


def bench_load(num_tensors: int = 100_000, repeats: int = 5) -> Dict[str, float]:
    trace = _synthetic_trace(num_tensors)
    with tempfile.TemporaryDirectory() as d:
        path = save_trace(trace, Path(d) / "big.tftrace")
        size = path.stat().st_size
        loads = []
        for _ in range(repeats):
            start = time.perf_counter()
            loaded = load_trace(path)
            loads.append(time.perf_counter() - start)
    if loaded != trace:
        raise AssertionError("the 100k-tensor trace did not round-trip")
    return {"tensors": num_tensors, "bytes": size, "load_min_s": min(loads), "load_median_s": statistics.median(loads)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,small", help="comma-separated conf/model options (default tiny,small)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="timed traced steps per run (default 5; the detached phase takes twice as many)")
    ap.add_argument("--batch", type=int, default=32, help="trainer.global_batch (default 32, as conf/)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default 1: CPU time then measures a step's whole cost)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    clock = "wall time" if torch.cuda.is_available() else "CPU time of the stepping thread"
    print(f"batch {args.batch} x seq 64 tokens; {args.rounds} traced and {2 * args.rounds} detached rounds; ratios are "
          f"medians of per-round ratios ({clock}); compute/step compares wall times\n")
    header = (f"{'model':<7} {'params':>8} {'device':>6} {'step':>9} {'traced/untraced':>16} {'detached/untraced':>18} "
              f"{'control':>8} {'compute/step':>12} {'tensors':>8} {'points':>7} {'peak':>10} "
              f"{'active (TERAIO 1.7%)':>21} {'graph':>7}")
    print(header)
    for model in args.models.split(","):
        r = bench_model(model.strip(), args.batch, args.rounds)
        print(f"{r['model']:<7} {r['params'] / 1e6:>7.2f}M {r['device']:>6} {r['untraced_s'] * 1e3:>7.0f}ms "
              f"{r['traced_ratio']:>15.2f}x {r['detached_ratio']:>17.2f}x {r['control_ratio']:>7.2f}x "
              f"{r['compute_share']:>12.2f} "
              f"{r['tensors']:>8,} {r['points']:>7,} {format_bytes(r['peak']):>10} "
              f"{r['active_mean']:>10.1%} (all {r['active_overall']:.1%}) {'static' if r['static'] else 'DYNAMIC':>7}",
              flush=True)
    load = bench_load()
    print(f"\nload a {load['tensors']:,}-tensor trace ({format_bytes(load['bytes'])} on disk): "
          f"{load['load_min_s']:.2f} s (min of 5), {load['load_median_s']:.2f} s median")
    print(f"TERAIO reports {TERAIO_ACTIVE_FRACTION:.1%} of allocated GPU memory active per kernel on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
