"""Step any torch.optim optimizer one sub-group of parameters at a time, bit-identically.

A plain ``optimizer.step()`` is one interval of the trace in which every parameter, gradient and
optimizer state is in use, so no plan can keep the device below the whole training state while
it runs (the feasible budget floor was about 60-70% of the unconstrained peak for GPT-style
models). :class:`SubgroupStepper` calls the optimizer's own ``step`` once per sub-group, with its
``param_groups`` narrowed to that sub-group's parameters: every call fires the optimizer's step
hooks, so the tracer records a pair of points per sub-group, and the plan can fetch one
sub-group's parameters, gradients and states while the others wait in a tier. The floor drops to
about one block's working set (24% of the peak for a 4-layer GPT, from 72%).

Exact: the optimizers of ``torch.optim`` (for-loop, foreach and fused) update each parameter from
its own gradient and state only, with per-parameter step counts, so updating a subset computes
the same bits as updating all at once. ``LBFGS`` (a closure over every parameter) is refused.

Example:
    >>> stepper = SubgroupStepper(optimizer, subgroup_bytes=0)  # one parameter per sub-group
    >>> loss.backward(); stepper(); optimizer.zero_grad()  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.utils._foreach_utils import _has_foreach_support

from tierflow.offload.optim.placement import SubGroup, partition_subgroups
from tierflow.profiling import remove_hooks

__all__ = ["SubgroupStepper"]


class SubgroupStepper:
    """Runs ``optimizer.step()`` once per sub-group of its parameters.

    Args:
        optimizer: Any per-parameter ``torch.optim.Optimizer`` (not LBFGS).
        subgroup_bytes: Parameter bytes per sub-group; 0 puts every parameter in its own. Memory
            vs overhead: smaller sub-groups let a plan keep fewer parameters, gradients and states
            on the device during the step; each sub-group costs one optimizer call (tens of
            microseconds of Python) and two trace points.
        free_grads: Drop each sub-group's gradients (``grad = None``) right after its update, as
            ``zero_grad(set_to_none=True)`` would after the whole step. A gradient is dead once its
            parameter is updated; left in place, every gradient stays allocated until the last
            sub-group is done, and that is the whole gradient state. Keep False if your loop
            reads gradients after the step.

    Raises:
        ValueError: an optimizer whose step is not separable by parameter, or a negative size.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, subgroup_bytes: int = 0, *, free_grads: bool = False) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("LBFGS cannot step by sub-group: its step is a closure over every parameter")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(subgroup_bytes, bool) or not isinstance(subgroup_bytes, int) or subgroup_bytes < 0:
            raise ValueError(f"subgroup_bytes={subgroup_bytes!r} must be a whole number >= 0 (0: one parameter each)")
        self.optimizer = optimizer
        self.subgroup_bytes = subgroup_bytes
        self.free_grads = free_grads
        self.subgroups: List[SubGroup] = []
        self._order: List[torch.nn.Parameter] = []
        self._ids: List[int] = []
        # Per sub-group: (param group index, its parameters in this sub-group), built once per
        # partition so a step costs O(sub-group), not O(all parameters), per sub-group.
        self._members: List[List[Tuple[int, List[torch.nn.Parameter]]]] = []
        self._hooks: List[Any] = []  # post-accumulate-grad hooks of fused_into_backward
        self._hooks_for: List[int] = []
        self._sub_of: Dict[int, int] = {}
        self._waiting: List[int] = []
        self._groups: List[Dict[str, Any]] = []
        self._armed = ""  # "fused" or "norms" while a backward runs inside one of those blocks
        self._early_norms: Dict[int, torch.Tensor] = {}  # id(param) -> its gradient's norm, taken in backward
        self._norm_type = 2.0

    def _partition(self) -> None:
        flat = [(gid, p) for gid, g in enumerate(self.optimizer.param_groups) for p in g["params"]]
        ids = [id(p) for _, p in flat]  # identities: == on tensors would compare their values
        if ids == self._ids:
            return  # the parameters did not change since the last step
        self._ids, self._order = ids, [p for _, p in flat]
        sizes = [(gid, p.numel() * p.element_size()) for gid, p in flat]
        self.subgroups = list(partition_subgroups(sizes, self.subgroup_bytes or 1))
        self._members = []
        for sub in self.subgroups:
            by_group: Dict[int, List[torch.nn.Parameter]] = {}
            for i, gid in zip(sub.param_ids, sub.group_ids):
                by_group.setdefault(gid, []).append(self._order[i])
            self._members.append(sorted(by_group.items()))

    def __call__(self, closure: Optional[Any] = None) -> None:
        """One optimizer step, sub-group by sub-group; ``param_groups`` is whole again afterwards."""
        if closure is not None:
            raise ValueError("a closure re-evaluates the whole model: call optimizer.step(closure) instead")
        self._partition()
        groups = self.optimizer.param_groups
        try:
            for k, sub in enumerate(self.subgroups):
                self.optimizer.param_groups = self._narrowed(groups, k)
                self.optimizer.step()
                self._release(sub)
        finally:
            self.optimizer.param_groups = groups  # the scheduler and state_dict see the real groups

    def clip_and_step(self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``clip_grad_norm_(parameters, max_norm)`` then the step, one sub-group at a time, bit-identically.

        ``torch.nn.utils.clip_grad_norm_`` reads every gradient in one interval, which keeps them
        all on the device at once. Here a first pass computes each sub-group's gradient norms in
        an interval of its own (Note [points without an update]), the total norm is formed exactly
        as torch forms it (per-tensor norms in ``parameters`` order, grouped by device and dtype,
        stacked, normed), and the second pass scales each sub-group's gradients right before its
        update.

        Returns:
            The total norm, as ``clip_grad_norm_`` returns it.
        """
        self._partition()
        params = list(dict.fromkeys(p for p in parameters if p.grad is not None))  # tied weights once
        if not params:
            self()
            return torch.tensor(0.0)
        position = {id(p): i for i, p in enumerate(params)}
        norms: Dict[int, torch.Tensor] = {}
        groups = self.optimizer.param_groups
        stepped = {id(p) for p in self._order}
        early, self._early_norms = self._early_norms, {}
        if self._norm_type == norm_type and all(id(p) in early for p in params):
            norms = early  # taken as each gradient became final (norms_in_backward): no pass needed
        try:
            for sub in self.subgroups if not norms else ():
                self.optimizer.param_groups = []
                self.optimizer.step()  # Note [points without an update]
                for i in sub.param_ids:
                    p = self._order[i]
                    if id(p) in position:
                        norms[id(p)] = _norm(p.grad, norm_type)
            for p in params:  # clipped but not stepped by this optimizer: normed here
                if id(p) not in stepped:
                    norms[id(p)] = _norm(p.grad, norm_type)
            ordered = [norms[id(p)] for p in _by_device_and_dtype(params)]
            first = params[0].grad.device
            total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in ordered]), norm_type)
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            clipped = set()
            for k, sub in enumerate(self.subgroups):
                grads = [self._order[i].grad for i in sub.param_ids if id(self._order[i]) in position]
                _scale(grads, coef)
                clipped.update(id(self._order[i]) for i in sub.param_ids)
                self.optimizer.param_groups = self._narrowed(groups, k)
                self.optimizer.step()
                self._release(sub)
            _scale([p.grad for p in params if id(p) not in clipped], coef)
        finally:
            self.optimizer.param_groups = groups
        return total

    @contextmanager
    def fused_into_backward(self) -> Iterator[None]:
        """Run one backward inside this block: each sub-group is updated inside it, the moment its
        last gradient is final, and its gradients are freed at once (Note [update in backward]).

        Use it when nothing needs every gradient first: no clipping by global norm, no gradient
        accumulation over micro-batches, no data-parallel reduction. Exact: each update reads its
        own parameter, gradient and state only, so the order of sub-groups changes nothing.

        Example:
            >>> with stepper.fused_into_backward():  # doctest: +SKIP
            ...     loss.backward()            # the whole optimizer step happens in here
        """
        self._install_hooks()
        self._waiting = [sum(1 for i in sub.param_ids if self._order[i].requires_grad) for sub in self.subgroups]
        self._groups = self.optimizer.param_groups
        self._armed = "fused"
        try:
            yield
            for k, left in enumerate(self._waiting):  # a sub-group part of which got no gradient
                if left > 0 and self._has_grads(k):
                    self._step_subgroup(k)
        finally:
            self._armed = ""
            self.optimizer.param_groups = self._groups

    @contextmanager
    def norms_in_backward(self, norm_type: float = 2.0) -> Iterator[None]:
        """Run the backward that makes the gradients final inside this block (the last
        micro-batch's): each gradient's norm is taken the moment it is final, so the next
        :meth:`clip_and_step` needs no pass over the gradients before the update (Note [update in
        backward]). Not under DDP: its reducer changes gradients after they are accumulated."""
        self._install_hooks()
        self._early_norms, self._norm_type = {}, norm_type
        self._armed = "norms"
        try:
            yield
        finally:
            self._armed = ""

    def _install_hooks(self) -> None:
        self._partition()
        if self._hooks_for == self._ids:
            return
        remove_hooks(self._hooks)
        self._sub_of = {id(self._order[i]): k for k, sub in enumerate(self.subgroups) for i in sub.param_ids}
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_final) for p in self._order if p.requires_grad]
        self._hooks_for = list(self._ids)

    def _grad_final(self, p: torch.Tensor) -> None:
        if self._armed == "norms":
            self._early_norms[id(p)] = _norm(p.grad, self._norm_type)
            return
        if self._armed != "fused":
            return
        k = self._sub_of.get(id(p))
        if k is None:
            return
        self._waiting[k] -= 1
        if self._waiting[k] == 0:
            self._step_subgroup(k)

    def _has_grads(self, k: int) -> bool:
        return any(self._order[i].grad is not None for i in self.subgroups[k].param_ids)

    def _step_subgroup(self, k: int) -> None:
        self._waiting[k] = -1  # stepped
        self.optimizer.param_groups = self._narrowed(self._groups, k)
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = self._groups
        for i in self.subgroups[k].param_ids:
            self._order[i].grad = None

    def _release(self, sub: SubGroup) -> None:
        if self.free_grads:
            for i in sub.param_ids:
                self._order[i].grad = None

    def _narrowed(self, groups: List[Dict[str, Any]], k: int) -> List[Dict[str, Any]]:
        # Fresh dicts of the live groups: the hyperparameters a scheduler set for this step.
        return [{**groups[gid], "params": params} for gid, params in self._members[k]]


# Note [update in backward]: ``register_post_accumulate_grad_hook`` fires once a parameter's
# gradient is final for this backward (every use of the parameter has contributed: the engine
# sums them before the accumulation node runs), and the parameter is not read by backward after
# that. Updating its sub-group there, and dropping the gradient, means gradients never wait for
# the whole backward: no gradient is written to a tier and read back, which is half the I/O of a
# step whose state lives on NVMe. The step hooks still fire (inside backward), so the tracer and
# the plan see each sub-group's update as points of the backward phase.


# Note [points without an update]: the tracer and the executor learn where they are in the
# optimizer phase from the optimizer's step hooks. A step over no parameter groups fires those
# hooks and updates nothing, so each sub-group's norm pass gets a pair of points of its own, and
# the plan can bring one sub-group's gradients in at a time for it.


def _norm(g: torch.Tensor, norm_type: float) -> torch.Tensor:
    """One gradient's norm, by the kernel ``clip_grad_norm_`` uses for it (foreach where supported)."""
    if _has_foreach_support([g], g.device):
        return torch._foreach_norm([g], norm_type)[0]
    return torch.linalg.vector_norm(g, norm_type)


def _by_device_and_dtype(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """``params`` in the order ``clip_grad_norm_`` stacks their norms: grouped by (device, dtype)."""
    groups: Dict[Any, List[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    return [p for members in groups.values() for p in members]


def _scale(grads: List[torch.Tensor], coef: torch.Tensor) -> None:
    by_device: Dict[Any, List[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), members in by_device.items():
        if _has_foreach_support(members, device):
            torch._foreach_mul_(members, coef.to(device))
        else:
            for g in members:
                g.mul_(coef.to(device))
