"""fp32 master weights for a model that trains in bf16: ZeRO-Offload's mixed-precision layout.

The model's parameters and gradients are bf16 (half the bytes on the device); each parameter's
fp32 master copy lives in ``optimizer.state[p]["master"]`` next to the optimizer's own state
(AdamW's moments...). A step turns each bf16 gradient into fp32, runs the wrapped optimizer's
own update on the master, and rounds the master back into the bf16 parameter. Because the master
is optimizer state, everything that already moves optimizer state moves it too: the offload
runtime pages it to host memory or NVMe between uses, :class:`SubgroupStepper` steps it sub-group
by sub-group, snapshots and checkpoints carry it. Which is the point: on the device only bf16
weights and gradients remain, and the fp32 bytes wait in the tiers.

Note [master step]: the wrapped optimizer's update runs with ``param_groups`` pointing at the
masters and ``state[master]`` aliased to the parameter's state without the ``master`` key (so an
optimizer that creates its state when ``state`` is empty still does); new and replaced entries
are copied back, and the aliases are gone when ``step`` returns. The update itself is the
optimizer class's own (its unpatched ``step``, so step hooks run once, around the whole step,
seeing the real parameters), so the recipe is bit-identical to the same optimizer run on fp32
masters by hand, in memory or not.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Type

import torch

__all__ = ["MASTER_KEY", "with_master_weights"]

MASTER_KEY = "master"
_CLASSES: Dict[type, type] = {}


def with_master_weights(cls: Type[torch.optim.Optimizer]) -> Type[torch.optim.Optimizer]:
    """``cls`` whose step updates fp32 masters of low-precision parameters (Note [master step]).

    Example:
        >>> model = torch.nn.Linear(4, 2).to(torch.bfloat16)
        >>> opt = with_master_weights(torch.optim.AdamW)(model.parameters(), lr=1e-3)
        >>> model(torch.ones(1, 4, dtype=torch.bfloat16)).sum().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["master"].dtype
        torch.float32
    """
    if cls in _CLASSES:
        return _CLASSES[cls]
    if issubclass(cls, torch.optim.LBFGS):
        raise ValueError("LBFGS cannot keep master weights: its step is a closure over every parameter")
    update = getattr(cls.step, "__wrapped__", cls.step)  # without the hook wrapper: hooks run once

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if closure is not None:
            raise ValueError("master weights take no closure: compute the loss and call backward() first")
        swapped = []
        try:
            for group in self.param_groups:
                params, masters = group["params"], []
                for p in params:
                    state = self.state[p]
                    master = state.get(MASTER_KEY)
                    if master is None:
                        master = state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
                    master.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
                    self.state[master] = {k: v for k, v in state.items() if k != MASTER_KEY}
                    masters.append(master)
                swapped.append((group, params, masters))
                group["params"] = masters
            update(self)
        finally:
            with torch.no_grad():
                for group, params, masters in swapped:
                    group["params"] = params
                    for p, master in zip(params, masters):
                        self.state[p].update(self.state.pop(master))
                        if master.grad is not None:
                            p.copy_(master)  # rounded to the parameter's dtype
                        master.grad = None
        return None

    made = type(f"Master{cls.__name__}", (cls,), {"step": step, "__doc__": f"{cls.__name__} on fp32 master weights."})
    _CLASSES[cls] = made
    return made
