"""Note [one storage per gradient]: every gradient the runtime may move owns its storage.

The runtime moves whole storages (Note [storage swap]) and keys each by one tensor. FSDP2 hands
out a block's sharded gradients as views of one reduce-scatter output: it assigns them one by one
and calls each parameter's post-accumulate-grad hooks in between, so evicting the first gradient
(the whole buffer) would leave nothing for the next views (``setStorage ... out of bounds for
storage of size 0``, found by the FSDP2 test). A hook registered before the tracer's and the
executor's gives such a gradient a storage of its own, a copy with the same bits. Only gradients
that are views of a larger storage are copied; the buffer dies with the last view, so the copies
cost one block's gradients at most, for the length of that block's reduce-scatter.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tierflow.profiling import local_tensor

__all__ = ["own_gradient_storages", "settle_fsdp2"]


def _shares_storage(grad: torch.Tensor) -> bool:
    local = local_tensor(grad)
    return local.untyped_storage().nbytes() > local.numel() * local.element_size()


def _own(param: torch.Tensor) -> None:
    grad = param.grad
    if grad is not None and _shares_storage(grad):
        with torch.no_grad():
            param.grad = grad.clone()


def own_gradient_storages(model: nn.Module) -> List[RemovableHandle]:
    """Register the hooks of Note [one storage per gradient] on every trainable parameter of ``model``.

    Returns:
        The hooks' handles (remove them when the runtime closes).
    """
    return [p.register_post_accumulate_grad_hook(_own) for p in model.parameters() if p.requires_grad]


def settle_fsdp2(model: nn.Module) -> None:
    """Note [FSDP2 settles first]: run FSDP2's lazy initialisation before the runtime moves anything.

    On its first forward FSDP2 checks that each sharded parameter still lives in the storage it
    padded at ``fully_shard`` by comparing data pointers; a shard the runtime had evicted (an empty
    storage, data pointer 0) fails the check and FSDP2 re-pads every such shard into new memory, all
    at once and inside the first step (found by the per-rank RSS test: the first step could not stay
    under its budget). Initialising first, while every shard is in place, makes that check pass.
    """
    state_of = getattr(model, "_get_fsdp_state", None)
    if state_of is None:
        return
    state = state_of()
    lazy_init = getattr(state, "_lazy_init", None)
    if lazy_init is None:
        raise AssertionError("this torch's FSDP2 has no _lazy_init: tierflow's FSDP2 support needs updating")
    lazy_init()
