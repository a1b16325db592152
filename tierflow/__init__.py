"""tierflow: train PyTorch models whose training state does not fit in accelerator memory.

The repository's folders install under this one name (``pyproject.toml`` maps them):
:mod:`tierflow.offload` (tiers, planner, runtime, tiered optimizer, integrations),
:mod:`tierflow.profiling` (the tensor-lifetime tracer), :mod:`tierflow.trainer` (the training loop
and the ``tierflow`` command) and :mod:`tierflow.conf` (the Hydra config tree).

The names most users need are re-exported here::

    from tierflow import OffloadConfig, OffloadRuntime, TieredOptimizer, TiersConfig
"""

import os as _os
import sys as _sys

# Note [huge pages for CPU tensors]: on a CPU run the "device" is RAM, so the runtime has glibc map
# every allocation of 1 MiB or more on its own (``map_large_allocations``): a freed tensor leaves
# RSS at once and the budget bounds resident memory. The price is that each new tensor's pages are
# faulted in again, 4 KiB at a time; FSDP2's gather and scatter copies ran 3.5x slower for it on
# 2 ranks. torch backs CPU tensors of 2 MiB or more with transparent huge pages when
# THP_MEM_ALLOC_ENABLE=1 is set before its first allocation, which cuts those faults 512-fold (the
# same FSDP2 step: 5.26 s -> 3.36 s, FSDP2 alone 3.26 s; docs/benchmarks.md). So importing
# tierflow before torch turns it on unless the environment says otherwise; a script that imports
# torch first should export it itself.
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from tierflow.offload import (  # noqa: E402 (after the note above)
    Budgets,
    HardwareModel,
    HostTierConfig,
    NumaTierConfig,
    NvmeTierConfig,
    OffloadConfig,
    OffloadPlan,
    OffloadRuntime,
    TieredOptimizer,
    TieredOptimizerConfig,
    TierEngine,
    TiersConfig,
    make_plan,
)
from tierflow.profiling import LifetimeTrace, LifetimeTracer, TracerConfig, load_trace, save_trace

__version__ = "0.1.0"

__all__ = [
    "Budgets",
    "HardwareModel",
    "HostTierConfig",
    "LifetimeTrace",
    "LifetimeTracer",
    "NumaTierConfig",
    "NvmeTierConfig",
    "OffloadConfig",
    "OffloadPlan",
    "OffloadRuntime",
    "TierEngine",
    "TieredOptimizer",
    "TieredOptimizerConfig",
    "TiersConfig",
    "TracerConfig",
    "__version__",
    "load_trace",
    "make_plan",
    "save_trace",
]
