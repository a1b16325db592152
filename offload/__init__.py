"""tierflow's offload engine: storage tiers, the transfer scheduler, calibration and the HardwareModel.

Importable on its own, without ``trainer``. The planner, simulator and runtime land here next.
"""

from offload._memory import aligned_empty
from offload.config import HostTierConfig, NumaTierConfig, NvmeTierConfig, SchedulerConfig, TiersConfig
from offload.engine import TierEngine
from offload.errors import ChecksumError, TierConfigError, TierError, TierFullError, TierIOError, TransferCancelled
from offload.hardware import HardwareModel, LinkModel, LinkSample, TierModel, fit_link
from offload.host import HostTier
from offload.numa import NumaNode, NumaTier, discover_numa_nodes, numa_placement
from offload.nvme import NvmeTier
from offload.scheduler import LinkStats, TransferKind, TransferScheduler
from offload.tier import Slot, Tier, TransferHandle
from offload.plan import Action, Decision, OffloadPlan, PlanError, PlanFileError, PlanningError, validate_plan
from offload.plan_config import OffloadConfig
from offload.planner import POLICIES, Budgets, feasible_minimum_bytes, make_plan
from offload.simulate import Simulation, simulate
from offload._optim_plan import UpdateCosts, UpdatePlacement, place_updates
from offload.optimizer import TieredOptimizer, TieredOptimizerConfig, TieredStepError
from offload.runtime import BudgetExceededError, OffloadRuntime, StepReport, explain_plan, nominal_hardware

__all__ = [
    "ChecksumError",
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
    "SchedulerConfig",
    "Slot",
    "Tier",
    "TierConfigError",
    "TierEngine",
    "TierError",
    "TierFullError",
    "TierIOError",
    "TierModel",
    "TiersConfig",
    "TransferCancelled",
    "TransferHandle",
    "TransferKind",
    "TransferScheduler",
    "aligned_empty",
    "discover_numa_nodes",
    "fit_link",
    "numa_placement",
    "Action",
    "Budgets",
    "Decision",
    "OffloadConfig",
    "OffloadPlan",
    "POLICIES",
    "PlanError",
    "PlanFileError",
    "PlanningError",
    "Simulation",
    "feasible_minimum_bytes",
    "make_plan",
    "simulate",
    "validate_plan",
    "TieredOptimizer",
    "TieredOptimizerConfig",
    "TieredStepError",
    "UpdateCosts",
    "UpdatePlacement",
    "place_updates",
    "BudgetExceededError",
    "OffloadRuntime",
    "StepReport",
    "explain_plan",
    "nominal_hardware",
]
