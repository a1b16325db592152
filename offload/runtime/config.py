"""The ``offload`` config group: which policy plans offloading, under which budgets, and how the
runtime that executes the plan profiles, falls back and re-profiles.

YAML in ``conf/offload/<policy>.yaml`` only selects a policy and overrides values; this dataclass
is the schema (registered with Hydra through ``tierflow.trainer.config``'s tree) and the one config
:class:`~tierflow.offload.runtime.offload_runtime.OffloadRuntime` takes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tierflow.offload.plan import POLICIES, Budgets
from tierflow.offload.plan.types import PlanningError

__all__ = ["OffloadConfig"]


@dataclass(kw_only=True)
class OffloadConfig:
    """Planner and runtime settings.

    Attributes:
        policy: ``none`` (default: nothing moves), ``lifetime`` (TERAIO/G10 rule under the budget)
            or a baseline: ``all_host``, ``zero_offload``, ``zero_infinity``, ``belady``.
        device_budget_bytes: Device budget in bytes; wins over ``device_budget_fraction``.
        device_budget_fraction: Device budget as a fraction of the traced unconstrained peak
            (e.g. 0.5). With neither set the budget is the unconstrained peak (nothing must move).
        tier_budget_bytes: Per-tier budgets, e.g. ``{host: 64000000000}``; a tier not named gets
            the capacity of its HardwareModel.
        profile_warmup: Steps the runtime runs untouched before profiling (optimizer state and
            allocator pools exist after the first step).
        profile_iterations: Steps traced (unconstrained) to make the plan from; the last one is
            planned, 2 or more also checks that iterations repeat.
        reprofile_after: After this many iterations that diverged from the trace since the plan
            was made, profile and plan again (0: never). It doubles after every re-profile, so a
            model that is simply dynamic is not profiled every few steps.
        shape_headroom: For tensors whose size varied among the profiled iterations (a mixture
            of experts routing tokens, variable sequence lengths), the fraction above the largest
            size seen that the plan reserves (Note [size reservations] in
            :mod:`tierflow.profiling.shapes`). Memory vs staying on the plan: a larger tensor
            leaves the plan for the rest of its step, after which the runtime plans for it.
        optimizer_subgroup_bytes: Parameter bytes the trainer steps together (0: one parameter at
            a time), through :class:`~tierflow.offload.optim.SubgroupStepper`: each sub-group is
            its own pair of trace points, so the plan pages parameters, gradients and states
            through the optimizer step. Smaller sub-groups lower the feasible budget; each costs
            one optimizer call. (The runtime itself does not step: a loop of your own uses the
            stepper for the same effect.)
        max_inflight_transfers: The runtime's own transfers in flight at once (0: as many as the
            plan issues). Memory vs overlap: a prefetch holds its device memory from the moment it
            starts, so fewer in flight lowers the momentary peak between points but leaves less
            time to hide each copy (compute waits for the oldest one to make room).
        build_in_tier: ``auto`` (default): when the training state would not fit the budget
            (``device_budget_bytes``, or on a CPU machine the memory available), the trainer
            materialises the model's parameters straight into a tier (NVMe on a CPU machine) and
            the runtime adopts them there, so no moment holds the whole model. ``always`` forces
            it, ``never`` builds on the device.
    """

    policy: str = "none"
    device_budget_bytes: Optional[int] = None
    device_budget_fraction: Optional[float] = None
    tier_budget_bytes: Dict[str, int] = field(default_factory=dict)
    profile_warmup: int = 1
    profile_iterations: int = 2
    reprofile_after: int = 3
    shape_headroom: float = 0.25
    max_inflight_transfers: int = 0
    optimizer_subgroup_bytes: int = 0
    build_in_tier: str = "auto"

    def __post_init__(self) -> None:
        p: List[str] = []
        if self.policy not in POLICIES:
            p.append(f"offload.policy={self.policy!r} is not valid; choose one of: {', '.join(POLICIES)}")
        if self.device_budget_bytes is not None and self.device_budget_bytes < 0:
            p.append(f"offload.device_budget_bytes={self.device_budget_bytes} must be >= 0")
        if self.device_budget_fraction is not None and not 0 < self.device_budget_fraction:
            p.append(f"offload.device_budget_fraction={self.device_budget_fraction} must be > 0, e.g. 0.5")
        for key, minimum in (("profile_warmup", 0), ("profile_iterations", 1), ("reprofile_after", 0),
                             ("max_inflight_transfers", 0), ("optimizer_subgroup_bytes", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                p.append(f"offload.{key}={value!r} must be a whole number >= {minimum}")
        if isinstance(self.shape_headroom, bool) or not isinstance(self.shape_headroom, (int, float)) or \
                not 0 <= self.shape_headroom <= 4:
            p.append(f"offload.shape_headroom={self.shape_headroom!r} must be a fraction between 0 and 4, e.g. 0.25")
        if self.build_in_tier not in ("auto", "always", "never"):
            p.append(f"offload.build_in_tier={self.build_in_tier!r} is not valid; choose auto, always or never")
        for tier, b in self.tier_budget_bytes.items():
            if b < 0:
                p.append(f"offload.tier_budget_bytes.{tier}={b} must be >= 0")
        if p:
            raise PlanningError("; ".join(p))
        if self.device_budget_fraction is not None and self.device_budget_fraction > 1:
            warnings.warn(f"offload.device_budget_fraction={self.device_budget_fraction} is above the traced peak: "
                          "iterations like the traced ones move nothing, only larger ones are held to it; "
                          "use a fraction below 1 (e.g. 0.5) to offload", stacklevel=2)

    def budgets(self) -> Budgets:
        """The :class:`~tierflow.offload.plan.Budgets` these settings describe."""
        return Budgets(device_bytes=self.device_budget_bytes, device_fraction=self.device_budget_fraction,
                       tier_bytes=tuple(sorted(self.tier_budget_bytes.items())))
