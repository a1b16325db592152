"""Doing: execute an OffloadPlan inside a training loop, over the tiers, bit-identically.

:class:`OffloadRuntime` profiles, plans and then runs every step under the plan: the executor
moves tensors at the plan's points, the residency table tracks where each one waits, and the
fallback (a layer-aware LRU) takes over for the rest of an iteration that diverges from the trace.
"""

from tierflow.offload.runtime._grads import settle_fsdp2
from tierflow.offload.runtime._residency import alias_bytes
from tierflow.offload.runtime.config import OffloadConfig
from tierflow.offload.runtime.offload_runtime import BudgetExceededError, OffloadRuntime, StepReport

__all__ = ["BudgetExceededError", "OffloadConfig", "OffloadRuntime", "StepReport", "alias_bytes", "settle_fsdp2"]
