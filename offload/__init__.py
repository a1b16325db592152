"""tierflow's offload engine: plan where idle tensors wait, and move them there during training.

Subpackages, each with one reason to change (``docs/architecture.md``):

- :mod:`~tierflow.offload.core`: the shared vocabulary (HardwareModel, tier names, errors, units).
- :mod:`~tierflow.offload.tiers`: storage tiers, the transfer scheduler, the engine, calibration.
- :mod:`~tierflow.offload.plan`: plan types, the planning context, policies, simulator, explanation.
- :mod:`~tierflow.offload.runtime`: executes a plan inside training (executor, fallback, residency).
- :mod:`~tierflow.offload.optim`: the tiered optimizer.
- :mod:`~tierflow.offload.integrations`: DeepSpeed.

Importable on its own, without ``tierflow.trainer``. The names below are the public API.
"""

from tierflow.offload.core import (
    ChecksumError,
    HardwareModel,
    LinkModel,
    LinkSample,
    TierConfigError,
    TierError,
    TierFullError,
    TierIOError,
    TierModel,
    TierName,
    TransferCancelled,
    fit_link,
)
from tierflow.offload.optim import (
    SubgroupStepper,
    TieredOptimizer,
    TieredOptimizerConfig,
    TieredStepError,
    UpdateCosts,
    UpdatePlacement,
    place_updates,
)
from tierflow.offload.plan import (
    POLICIES,
    Action,
    Budgets,
    Decision,
    OffloadPlan,
    PlanError,
    PlanFileError,
    PlanningError,
    Simulation,
    explain_plan,
    feasible_minimum_bytes,
    make_plan,
    plot_plan,
    simulate,
    validate_plan,
)
from tierflow.offload.runtime import BudgetExceededError, OffloadConfig, OffloadRuntime, StepReport
from tierflow.offload.runtime.offload_runtime import nominal_hardware
from tierflow.offload.tiers import (
    HostTier,
    HostTierConfig,
    LinkStats,
    NumaNode,
    NumaTier,
    NumaTierConfig,
    NvmeTier,
    NvmeTierConfig,
    SchedulerConfig,
    Slot,
    Tier,
    TierEngine,
    TiersConfig,
    TransferHandle,
    TransferKind,
    TransferScheduler,
    aligned_empty,
    discover_numa_nodes,
    numa_placement,
)

__all__ = [
    "POLICIES",
    "Action",
    "BudgetExceededError",
    "Budgets",
    "ChecksumError",
    "Decision",
    "HardwareModel",
    "HostTier",
    "HostTierConfig",
    "LinkModel",
    "LinkSample",
    "LinkStats",
    "NumaNode",
    "NumaTier",
    "NumaTierConfig",
    "NvmeTier",
    "NvmeTierConfig",
    "OffloadConfig",
    "OffloadPlan",
    "OffloadRuntime",
    "PlanError",
    "PlanFileError",
    "PlanningError",
    "SchedulerConfig",
    "Simulation",
    "Slot",
    "SubgroupStepper",
    "StepReport",
    "Tier",
    "TierConfigError",
    "TierEngine",
    "TierError",
    "TierFullError",
    "TierIOError",
    "TierModel",
    "TierName",
    "TieredOptimizer",
    "TieredOptimizerConfig",
    "TieredStepError",
    "TiersConfig",
    "TransferCancelled",
    "TransferHandle",
    "TransferKind",
    "TransferScheduler",
    "UpdateCosts",
    "UpdatePlacement",
    "aligned_empty",
    "discover_numa_nodes",
    "explain_plan",
    "feasible_minimum_bytes",
    "fit_link",
    "make_plan",
    "nominal_hardware",
    "numa_placement",
    "place_updates",
    "plot_plan",
    "simulate",
    "validate_plan",
]
