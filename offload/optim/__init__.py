"""The tiered optimizer: any torch.optim optimizer with its state streamed through the tiers.

Sub-groups are read ahead, updated by the wrapped optimizer's own step and written behind;
:func:`place_updates` decides per sub-group whether the update runs on the CPU or the device.
:class:`SubgroupStepper` steps any plain optimizer one sub-group at a time, so a plan can page
parameters, gradients and states through the optimizer step. :func:`with_master_weights` keeps
fp32 master weights of bf16 parameters in the optimizer state (ZeRO-Offload's layout).
"""

from tierflow.offload.optim.master import with_master_weights
from tierflow.offload.optim.optimizer import TieredOptimizer, TieredOptimizerConfig, TieredStepError
from tierflow.offload.optim.placement import UpdateCosts, UpdatePlacement, place_updates
from tierflow.offload.optim.subgroups import SubgroupStepper

__all__ = ["SubgroupStepper", "TieredOptimizer", "TieredOptimizerConfig", "TieredStepError", "UpdateCosts", "UpdatePlacement",
           "place_updates", "with_master_weights"]
