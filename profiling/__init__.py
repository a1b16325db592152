"""tierflow's tensor-lifetime profiler: trace real training iterations, derive memory timelines.

Importable on its own, without ``trainer``::

    from profiling import LifetimeTracer, memory_timeline, save_trace
    tracer = LifetimeTracer(model, optimizer)
    with tracer:
        for batch in batches:
            with tracer.iteration():
                tracer.mark_inputs(batch)
                train_step(batch)
    trace = tracer.trace()            # a LifetimeTrace: pure data
    print(memory_timeline(trace).peak)
    save_trace(trace, "trace.tftrace")
"""

from profiling.idle import IdleInterval, IdleScore, idle_intervals, top_idle_tensors
from profiling.report import ReportFiles, format_report, plot_memory_timeline, write_report
from profiling.stability import Divergence, Stability, check_stability
from profiling.storage import FORMAT_VERSION, TraceFileError, load_trace, save_trace
from profiling.timeline import CATEGORIES, ActiveFraction, MemoryTimeline, Peak, active_fraction, memory_timeline
from profiling.trace import (Category, LifetimeTrace, Phase, Point, PointKind, TensorRecord, activation_key, grad_key,
                             input_key, state_key, validate_trace)
from profiling.tracer import LifetimeTracer, TracerConfig, trace_iterations

__all__ = [
    "CATEGORIES",
    "FORMAT_VERSION",
    "ActiveFraction",
    "Category",
    "Divergence",
    "IdleInterval",
    "IdleScore",
    "LifetimeTrace",
    "LifetimeTracer",
    "MemoryTimeline",
    "Peak",
    "Phase",
    "Point",
    "PointKind",
    "ReportFiles",
    "Stability",
    "TensorRecord",
    "TraceFileError",
    "TracerConfig",
    "activation_key",
    "active_fraction",
    "check_stability",
    "format_report",
    "grad_key",
    "idle_intervals",
    "input_key",
    "load_trace",
    "memory_timeline",
    "plot_memory_timeline",
    "save_trace",
    "state_key",
    "top_idle_tensors",
    "trace_iterations",
    "validate_trace",
    "write_report",
]
