"""tierflow's tensor-lifetime profiler: trace real training iterations, derive memory timelines.

Importable on its own, without ``trainer``::

    from tierflow.profiling import LifetimeTracer, memory_timeline, save_trace
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

from tierflow.profiling import torch_compat
from tierflow.profiling._tensors import (
    flat_tensors,
    held_storage,
    is_fake_dispatch,
    local_tensor,
    remove_hooks,
    storage_of,
)
from tierflow.profiling.idle import IdleInterval, IdleScore, idle_intervals, top_idle_tensors
from tierflow.profiling.report import ReportFiles, format_report, plot_memory_timeline, write_report
from tierflow.profiling.stability import Divergence, Stability, check_stability, latest_frees
from tierflow.profiling.storage import FORMAT_VERSION, TraceFileError, load_trace, save_trace
from tierflow.profiling.timeline import (
                             CATEGORIES,
                             ActiveFraction,
                             MemoryTimeline,
                             Peak,
                             active_fraction,
                             memory_timeline,
)
from tierflow.profiling.trace import (
                             Category,
                             LifetimeTrace,
                             Phase,
                             Point,
                             PointKind,
                             TensorRecord,
                             activation_key,
                             grad_key,
                             input_key,
                             point_label,
                             state_key,
                             validate_trace,
)
from tierflow.profiling.tracer import LifetimeTracer, MovingTensors, TracerConfig
from tierflow.profiling.window import TraceWindow, trace_iterations

__all__ = [
    "flat_tensors",
    "held_storage",
    "is_fake_dispatch",
    "local_tensor",
    "remove_hooks",
    "storage_of",
    "torch_compat",
    "CATEGORIES",
    "FORMAT_VERSION",
    "ActiveFraction",
    "Category",
    "Divergence",
    "IdleInterval",
    "IdleScore",
    "LifetimeTrace",
    "LifetimeTracer",
    "MovingTensors",
    "MemoryTimeline",
    "Peak",
    "Phase",
    "Point",
    "PointKind",
    "ReportFiles",
    "Stability",
    "TensorRecord",
    "TraceFileError",
    "TraceWindow",
    "TracerConfig",
    "activation_key",
    "active_fraction",
    "check_stability",
    "format_report",
    "grad_key",
    "idle_intervals",
    "input_key",
    "latest_frees",
    "load_trace",
    "memory_timeline",
    "plot_memory_timeline",
    "save_trace",
    "point_label",
    "state_key",
    "top_idle_tensors",
    "trace_iterations",
    "validate_trace",
    "write_report",
]
