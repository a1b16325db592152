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

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from tierflow.offload.runtime import alias_bytes, settle_fsdp2
from tierflow.offload.runtime.materialize import MaterializeError, TierPlacement
from tierflow.offload.tiers import trim_freed_memory
from tierflow.profiling import local_tensor

__all__ = ["ShardPlacement", "block_modules", "is_sharded", "shard_blocks", "shard_on_meta"]


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` (or to any of its modules)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def block_modules(model: nn.Module) -> List[nn.Module]:
    """The modules :func:`shard_blocks` makes FSDP2 units of, innermost first (Note [which modules are units]).

    Every child of an ``nn.ModuleList``, or of an ``nn.Sequential`` or ``nn.ModuleDict`` of two or
    more modules of one class, that has parameters: GPT's ``blocks``, a transformers model's
    ``layers``/``h``/``block`` (both stacks of an encoder-decoder), timm's ``nn.Sequential``
    blocks, torchtitan's ``ModuleDict`` of layers, the stages and blocks of a hierarchical model.
    A module listed twice (one layer applied several times), or one that shares a parameter with a
    module outside it, is left to the unit around it; a model without such containers has none
    (the root is then the only unit).
    """
    seen: Dict[int, int] = {}
    candidates: List[nn.Module] = []
    for container in model.modules():
        for child in _repeated(container):
            seen[id(child)] = seen.get(id(child), 0) + 1
            if seen[id(child)] == 1 and child is not model and next(child.parameters(), None) is not None:
                candidates.append(child)
    holders: Dict[int, List[int]] = {}  # parameter -> the modules that hold it directly
    for m in model.modules():
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append(id(m))
    units = [m for m in candidates if seen[id(m)] == 1 and not _shares_outside(m, holders)]
    order: Dict[int, int] = {}

    def post_order(m: nn.Module) -> None:
        for child in m.children():
            post_order(child)
        order.setdefault(id(m), len(order))

    post_order(model)
    return sorted(units, key=lambda m: order[id(m)])  # children before their parents: FSDP2's order


def _repeated(container: nn.Module) -> List[nn.Module]:
    """The blocks ``container`` holds, a module held twice listed twice (``children()`` lists it once):
    every entry of a ``ModuleList``; of a ``Sequential`` or ``ModuleDict`` of two or more modules
    of one class (timm's blocks, torchtitan's ``layers``); none of any other module."""
    if isinstance(container, nn.ModuleList):
        return list(container)
    if isinstance(container, (nn.Sequential, nn.ModuleDict)):
        held = list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)
        return held if len(held) >= 2 and len({type(m) for m in held}) == 1 else []
    return []


def _shares_outside(unit: nn.Module, holders: Dict[int, List[int]]) -> bool:
    """A parameter of ``unit`` is also held by a module outside it (FSDP2 cannot shard it apart)."""
    inside = {id(m) for m in unit.modules()}
    return any(h not in inside for p in unit.parameters() for h in holders[id(p)])


# Note [which modules are units]: FSDP2 gathers a unit's parameters for its forward and backward,
# so the units decide the smallest budget a rank can train in: one unit for the whole model
# gathers everything at once. Units are therefore the repeated blocks, found by structure rather
# than by name: the children of every ``ModuleList`` and of every ``Sequential`` or ``ModuleDict``
# whose children are all of one class, nested ones included (a stage's blocks are units inside the stage's unit, an
# MoE block's experts inside the block's), applied innermost first as FSDP2 requires; the root is
# the last unit and takes whatever no unit holds. FSDP2 refuses a module sharded twice and a
# parameter in two units, so a block applied several times (ALBERT's shared layer) and a block
# that shares a weight with any module outside it (another stack, the root's head) stay in the
# unit around them, which still trains exactly, only with more gathered at once. For other
# choices, call ``fully_shard`` yourself before tierflow (see the module doc).


def shard_blocks(model: nn.Module, *, mesh: Optional[object] = None, device: Optional[torch.device] = None,
                 reshard_after_forward: bool = True, mp_policy: Optional[Any] = None) -> nn.Module:
    """``fully_shard`` each unit of :func:`block_modules`, then the root; returns ``model`` (sharded in place).

    Args:
        model: The model, materialised on this rank's device (every rank with the same values:
            each keeps its own shard).
        mesh: A 1-D ``DeviceMesh`` over the ranks; by default every rank of the default process group.
        device: The device the default mesh spans; by default the parameters' (give it for a model
            on the meta device, see :func:`shard_on_meta`).
        reshard_after_forward: FSDP2's option: True frees each block's gathered parameters after its
            forward (and gathers them again for backward); False keeps them until backward, which
            saves an all-gather and costs one block's full parameters per block until then.
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` for every unit, e.g. ``param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32``: the shards (and the optimizer) stay fp32, each unit
            gathers and computes in bf16 and reduces its gradients in fp32 (Note [mixed precision
            on shards]). None: FSDP2's default, everything in the parameters' dtype.

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
        device = device or next(model.parameters()).device
        if device.type == "meta":
            raise ValueError("the model is on the meta device: pass the device its shards will live on")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: Dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for block in block_modules(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model



# Note [mixed precision on shards]: with FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
# reduce_dtype=fp32)`` the shards stay fp32 and are the master weights: the optimizer steps them,
# and each unit casts its shards to bf16 right before the all-gather (an operation the tracer
# sees: a temporary), gathers bf16 (half the bytes of an fp32 gather, and of gloo's hidden buffer)
# and computes in bf16; its gradients are reduce-scattered in fp32 into fp32 gradient shards. So
# what the runtime moves, shards, gradients and optimizer states, is what it moves without a
# policy; only the gathered bytes and the temporaries change, and the trace measures both. The
# trainer's ``trainer.precision=bf16_master`` under FSDP2 is this policy, not bf16 parameters
# with masters in the optimizer state as on one rank: the same recipe, FSDP2's way.


# Note [sharded build]: a rank that builds the whole model and then shards it holds every parameter
# once (a quarter of an AdamW training state, times the ranks of a node), which is what keeps a
# model larger than a node's memory from starting. Instead, the model is sharded while it is still
# on the meta device (a copy of the recorded one: fully_shard needs no values), ``to_empty`` gives
# each rank its padded shards (untouched pages cost no memory), and FSDP2's lazy initialisation runs
# then, while every shard is in place (Note [FSDP2 settles first]). Materialising the recorded
# model then computes each full tensor once, exactly as eager construction does, and
# :class:`ShardPlacement` copies this rank's rows into its shard (FSDP2's ``Shard(0)``: the rows
# ``torch.chunk`` gives this rank) and, with a tier, sends the shard there at once. So a rank holds
# one full tensor and one shard at a time, and every rank's shards equal what ``fully_shard`` of
# the eagerly built model holds, byte for byte (padding included). Under
# ``torch.use_deterministic_algorithms`` (``trainer.deterministic``) ``torch.empty`` fills new memory
# with NaN, which would write every shard at once (found by sampling RSS: a rank of a 1.8B model
# rose by its 3.4 GB of shards before the first one went to NVMe); the shards are written whole by
# the build, so they are allocated unfilled.


@contextlib.contextmanager
def _untouched() -> Iterator[None]:
    """``torch.empty`` leaves new memory unwritten inside this block, deterministic mode or not."""
    import torch.utils.deterministic as deterministic

    fill = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        deterministic.fill_uninitialized_memory = fill


def shard_on_meta(meta_model: nn.Module, *, device: torch.device, tier: Any = None, mesh: Optional[object] = None,
                  reshard_after_forward: bool = True, mp_policy: Optional[Any] = None
                  ) -> Tuple[nn.Module, "ShardPlacement"]:
    """Shard a copy of ``meta_model`` (on the meta device) per block; returns it with the ``place`` that fills it.

    Pass the place to :func:`~tierflow.offload.runtime.materialize.materialize` with ``meta_model``
    and its recorded program: the returned model then holds this rank's shards of the values eager
    construction gives (Note [sharded build]); ``meta_model`` keeps only empty placeholders.

    Args:
        meta_model: The model :func:`~tierflow.offload.runtime.materialize.record_init` built.
        device: The device the shards live on.
        tier: An open tier to write each parameter shard into as soon as it is complete (its
            storage is then empty; :meth:`~tierflow.offload.OffloadRuntime.adopt` takes it over);
            None keeps the shards on ``device``.
        mesh, reshard_after_forward, mp_policy: As for :func:`shard_blocks`.

    Raises:
        ValueError: the model cannot be copied (a module holding something ``copy.deepcopy`` refuses).
    """
    try:
        sharded = copy.deepcopy(meta_model)
    except Exception as exc:
        raise ValueError(f"{type(meta_model).__name__} cannot be copied on the meta device to be sharded there "
                         f"({type(exc).__name__}: {exc})") from None
    shard_blocks(sharded, mesh=mesh, device=device, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    with _untouched():
        sharded.to_empty(device=device)
        settle_fsdp2(sharded)
    return sharded, ShardPlacement(sharded, tier)


class ShardPlacement(TierPlacement):
    """A ``place`` for ``materialize`` that keeps this rank's rows of each tensor in an FSDP2 model's shard.

    Buffers and unsharded parameters are copied whole. With a ``tier``, each parameter shard is
    written there once complete and its storage emptied, into :class:`TierPlacement`'s slots, so
    the runtime adopts it the same way.
    """

    def __init__(self, sharded: nn.Module, tier: Any = None) -> None:
        super().__init__(tier)
        self._targets: Dict[str, torch.Tensor] = dict(sharded.named_buffers(remove_duplicate=False))
        self._targets.update(sharded.named_parameters(remove_duplicate=False))

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        target = self._targets.get(name)
        if target is None:
            raise MaterializeError(f"{name} is not a parameter or buffer of the sharded model")
        local = local_tensor(target)
        with torch.no_grad():
            if local is target:
                target.copy_(tensor)
            else:
                local.copy_(self._rows(name, target, tensor, local))
        if self.tier is not None and local is not target:
            self._send(name, local)
        held = torch.empty(tensor.shape, dtype=tensor.dtype)
        held.untyped_storage().resize_(0)
        return held

    @staticmethod
    def _rows(name: str, target: Any, tensor: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import Shard

        mesh = target.device_mesh
        if tuple(target.placements) != (Shard(0),):
            raise MaterializeError(f"{name} is sharded as {target.placements}; a sharded build supports FSDP2's "
                                   "default Shard(0) only (shard the built model instead)")
        rank, world = mesh.get_local_rank(), mesh.size()
        chunks = torch.chunk(tensor, world, dim=0)
        rows = chunks[rank] if rank < len(chunks) else tensor.narrow(0, 0, 0)
        if rows.shape != local.shape:
            raise MaterializeError(f"{name}: FSDP2 gave rank {rank} a shard of {tuple(local.shape)}, torch.chunk "
                                   f"gives {tuple(rows.shape)}: this torch shards differently from tierflow's build")
        return rows

    def _send(self, name: str, local: torch.Tensor) -> None:
        storage = local.untyped_storage()  # FSDP2's padded shard, of which ``local`` is the unpadded rows
        self.write(name, alias_bytes(storage).view(local.dtype))  # an alias: Note [alias, not share]
        storage.resize_(0)
        trim_freed_memory()

    def read(self, name: str) -> torch.Tensor:
        """Never: a rank holds only its rows of a placed tensor."""
        raise MaterializeError(f"the constructor computes a tensor from the loaded {name}, of which a sharded build "
                               "keeps only this rank's rows; this model cannot be built sharded from model.path")
