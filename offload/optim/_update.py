"""Running the wrapped optimizer's own ``step()`` on one sub-group of the tiered optimizer.

The wrapped optimizer never sees the whole model at once: for sub-group ``i`` its ``param_groups``
are narrowed to that sub-group's parameters (sharing every hyperparameter) and its ``state`` holds
just their state, as views into the memory the state was read into. Whatever it changed in the
group dicts (a hyperparameter it adapts itself) is copied back afterwards.

Note [parameters set aside]: during an atomic step a sub-group can be updated on *proxies*
(copies of its parameters carrying the same gradients) instead of the parameters themselves. The
new values wait there until the step commits and are then copied in; a failed step just drops
them. Nothing the forward or backward pass reads changes before the commit, which is what lets
``overlap_backward`` update sub-groups while backward is still running, and lets a step be redone
when the gradients change after an early update (clipping, accumulation). The optimizer's step is
a function of (parameter, gradient, state) values only, so updating a copy gives the same bits.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from tierflow.offload.optim._state import is_tiered
from tierflow.offload.optim.placement import SubGroup
from tierflow.offload.tiers._nvme_io import checksum_fn
from tierflow.profiling import local_tensor

__all__ = ["SubgroupUpdater", "grad_mark"]

_XXH3 = checksum_fn("xxh3")


class SubgroupUpdater:
    """Applies the wrapped optimizer to one sub-group at a time and measures the CPU update rate.

    Args:
        inner: the wrapped optimizer (its ``param_groups`` are narrowed during each call).
        params: every parameter, in flat ``param_groups`` order.
        subgroups: the partition of ``params``.
    """

    def __init__(self, inner: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 subgroups: Sequence[SubGroup]) -> None:
        self.inner = inner
        self.params = list(params)
        self.subgroups = tuple(subgroups)
        self.cpu_update_bytes_per_s = 0.0  # exponential average of measured CPU updates
        self.update_s = 0.0

    def sub_params(self, i: int) -> List[torch.Tensor]:
        return [self.params[j] for j in self.subgroups[i].param_ids]

    def update(self, i: int, states: List[Dict[str, Any]], *, where: Optional[str], aside: bool,
               state_bytes: int) -> Tuple[List[Dict[str, Any]], Optional[List[torch.Tensor]]]:
        """Update sub-group ``i`` from ``states``.

        Args:
            i: the sub-group.
            states: its per-parameter state dicts (tiered tensors are views the update may change).
            where: ``None`` for CPU parameters; for CUDA ones ``"cpu"`` (gradients come to the host,
                new parameters go back) or ``"device"`` (the state visits the device).
            aside: update proxies and return them (Note [parameters set aside]) instead of
                changing the parameters now.
            state_bytes: bytes of tiered state, for the measured update rate.

        Returns:
            The new state dicts, and the tensors holding the new parameter values when they were
            not written into the parameters (``aside``, or a CPU update of CUDA parameters
            with ``aside``); None when the parameters already hold them.
        """
        params = self.sub_params(i)
        t0 = time.perf_counter()
        on_device = bool(params) and params[0].device.type != "cpu"
        if on_device and where == "device":
            device = params[0].device
            states = [{k: v.to(device, non_blocking=True) if is_tiered(v) else v for k, v in s.items()} for s in states]
            targets = _proxies(params, device) if aside else params
        elif on_device or aside:  # CPU update on host copies of the parameters
            targets = _proxies(params, torch.device("cpu"))
        else:
            targets = params
        out = self._inner_step(i, targets, states)
        new: Optional[List[torch.Tensor]] = None
        if targets is not params:
            if aside:
                new = targets
            else:  # CPU update of CUDA parameters, applied now
                for p, t in zip(params, targets):
                    p.copy_(t, non_blocking=True)
        dt = time.perf_counter() - t0
        self.update_s += dt
        if not on_device or where == "cpu":
            rate = (self.subgroups[i].param_bytes + state_bytes) / max(dt, 1e-9)
            self.cpu_update_bytes_per_s = rate if not self.cpu_update_bytes_per_s else \
                0.8 * self.cpu_update_bytes_per_s + 0.2 * rate
        return out, new

    def update_many(self, indices: Sequence[int], states: List[List[Dict[str, Any]]],
                    state_bytes: int) -> List[List[Dict[str, Any]]]:
        """Update several sub-groups of CPU parameters in place with one call of the wrapped step.

        One call over all their parameters is what the plain optimizer does (a fused or foreach
        kernel over every tensor at once), so the result is the same bits with less per-call cost.
        """
        t0 = time.perf_counter()
        pids = [pid for i in indices for pid in self.subgroups[i].param_ids]
        gids = [gid for i in indices for gid in self.subgroups[i].group_ids]
        flat = self._step([self.params[j] for j in pids], gids, [s for group in states for s in group])
        out, pos = [], 0
        for i in indices:
            n = len(self.subgroups[i].param_ids)
            out.append(flat[pos:pos + n])
            pos += n
        dt = time.perf_counter() - t0
        self.update_s += dt
        rate = (sum(self.subgroups[i].param_bytes for i in indices) + state_bytes) / max(dt, 1e-9)
        self.cpu_update_bytes_per_s = rate if not self.cpu_update_bytes_per_s else \
            0.8 * self.cpu_update_bytes_per_s + 0.2 * rate
        return out

    def apply(self, i: int, new: List[torch.Tensor]) -> None:
        """Copy parameters set aside by :meth:`update` into sub-group ``i``'s parameters."""
        for p, t in zip(self.sub_params(i), new):
            p.copy_(t, non_blocking=True)

    def _inner_step(self, i: int, params: List[torch.Tensor], states: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return self._step(params, self.subgroups[i].group_ids, states)

    def _step(self, params: List[torch.Tensor], group_ids: Sequence[int],
              states: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Run the wrapped optimizer's own step on ``params`` only (their state swapped in)."""
        inner, groups = self.inner, self.inner.param_groups
        sub: Dict[int, Dict[str, Any]] = {}
        for p, gid in zip(params, group_ids):
            sub.setdefault(gid, {**groups[gid], "params": []})["params"].append(p)
        for p, s in zip(params, states):
            if s:
                inner.state[p] = s
        inner.param_groups = list(sub.values())
        try:
            inner.step()
        finally:
            inner.param_groups = groups
            for gid, g in sub.items():  # hyperparameters the optimizer itself changed
                for k, v in g.items():
                    if k != "params" and groups[gid].get(k) is not v:
                        groups[gid][k] = v
            out = [inner.state.pop(p, {}) for p in params]
        return out


def grad_mark(g: torch.Tensor) -> Hashable:
    """What tells, at ``step()``, whether ``g`` changed since an early update read it
    (Note [overlap is checked, never trusted]): its version counter, or for a DTensor gradient
    (FSDP2) an XXH3 digest of its local shard's bytes (the nvme tier's chunk checksum). In-place
    ops on a DTensor change the shard without bumping the shard's version counter, foreach ops
    (``clip_grad_norm_``) not even the wrapper's, and FSDP2 accumulates into the shard directly;
    only the bytes tell.
    """
    local = local_tensor(g)
    if local is g:
        return g._version
    if local.device.type != "cpu":
        raise AssertionError("grad_mark reads a DTensor gradient's bytes on the host; CUDA shards are refused earlier")
    return _XXH3(local.detach().contiguous().view(-1).view(torch.uint8))


def _proxies(params: Sequence[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    out = []
    for p in params:
        proxy = p.detach().to(device, copy=True)
        proxy.grad = None if p.grad is None else p.grad.to(device)  # shared, not copied, on the same device
        out.append(proxy)
    return out
