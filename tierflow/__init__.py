"""tierflow: train PyTorch models whose training state does not fit in accelerator memory.

The repository's folders install under this one name (``pyproject.toml`` maps them):
:mod:`tierflow.offload` (tiers, planner, runtime, tiered optimizer, integrations),
:mod:`tierflow.profiling` (the tensor-lifetime tracer), :mod:`tierflow.trainer` (the training loop
and the ``tierflow`` command) and :mod:`tierflow.conf` (the Hydra config tree).

The names most users need are re-exported here::

    from tierflow import OffloadConfig, OffloadRuntime, TieredOptimizer, TiersConfig
"""

from tierflow.offload import (
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
