"""tierflow on FSDP2 (``torch.distributed.fsdp.fully_shard``): shard first, then offload.

FSDP2 shards every parameter over the ranks as a DTensor; during a block's forward and backward
it gathers that block's parameters and frees them after. tierflow runs beside it on each rank:
the runtime profiles, plans and moves this rank's *shards* (parameters, gradients after the
reduce-scatter, optimizer states) and its activations, with a per-rank budget. Nothing moves the
gathered parameters: FSDP2 frees them itself. From your own loop::

    from torch.distributed.fsdp import fully_shard
    from tierflow.offload import OffloadConfig, OffloadRuntime
    from tierflow.offload.integrations.fsdp2 import shard_blocks

    model = shard_blocks(model)                  # fully_shard per block, then the root
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)    # on the sharded parameters
    rt = OffloadRuntime(model, optimizer, OffloadConfig(policy="lifetime", device_budget_fraction=0.5))
    for batch in loader:
        with rt.step(batch):
            loss_fn(model(batch)).backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

What makes the runtime work on sharded state (and why the results stay bit-identical): a
DTensor's bytes live in its local tensor, so every key names the local shard's storage (Note
[local shards] in ``tierflow.profiling._tensors``); FSDP2's sharded gradients are views of one
reduce-scatter buffer and get storages of their own (Note [one storage per gradient]); the
runtime's dispatch modes let DTensor's fake-tensor sharding propagation through (Note [fake
tensors pass]) and never evict a buffer a collective still reads (Note [collectives in flight]).
"""

from __future__ import annotations

from typing import List, Optional

import torch.distributed as dist
from torch import nn

__all__ = ["block_modules", "is_sharded", "shard_blocks"]


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` (or to any of its modules)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def block_modules(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks of ``model``: the children of its largest ``nn.ModuleList`` (by parameters).

    GPT's ``blocks``, a transformers model's ``layers``/``h``/``block``: each becomes one FSDP2 unit,
    so a rank gathers one block's parameters at a time. A model without a ``ModuleList`` has none
    (the root is then the only unit).
    """
    best, best_numel = [], 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            numel = sum(p.numel() for p in m.parameters())
            if numel > best_numel:
                best, best_numel = list(m), numel
    return best


def shard_blocks(model: nn.Module, *, mesh: Optional[object] = None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each block of :func:`block_modules`, then the root; returns ``model`` (sharded in place).

    Args:
        model: The model, materialised on this rank's device (every rank with the same values:
            each keeps its own shard).
        mesh: A 1-D ``DeviceMesh`` over the ranks; by default every rank of the default process group.
        reshard_after_forward: FSDP2's option: True frees each block's gathered parameters after its
            forward (and gathers them again for backward); False keeps them until backward, which
            saves an all-gather and costs one block's full parameters per block until then.

    Raises:
        ValueError: no process group is initialised (start the run with torchrun, or call
            ``torch.distributed.init_process_group`` first), or the model is sharded already.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("FSDP2 needs a process group: start the run with torchrun (or call "
                         "torch.distributed.init_process_group first)")
    if is_sharded(model):
        raise ValueError("the model is sharded already: call shard_blocks once, on the unsharded model")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in block_modules(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model

