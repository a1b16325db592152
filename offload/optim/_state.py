"""How one sub-group's optimizer state is laid out in one flat byte buffer, and the staging buffers.

A sub-group's per-parameter state (whatever the wrapped optimizer keeps in ``optimizer.state[p]``)
is discovered after the optimizer created it, never assumed: every tensor with more than one
element goes into the sub-group's buffer at a 64-byte aligned offset; scalars (Adam's ``step``),
one-element tensors and non-tensor values stay in host memory as they are. During an update the
optimizer's state dict holds *views* into the staging buffer, so an in-place update (Adam's
``lerp_``/``mul_``) writes straight into the bytes that go back to the tier; a value the
optimizer replaced instead (SGD's first momentum buffer) is copied in after the step.

Note [local state]: staging buffers and resident state are what the CPU update touches every step,
so on a machine with several NUMA nodes they are bound (``mbind``, before first touch) to the
node(s) of the CPUs the process runs on; state that waits between steps goes to the ``numa`` tier's
memory-only (CXL) nodes. This follows the CXL fine-tuning study: placement matters more than capacity.

Note [layout is rediscovered]: the layout is recomputed after every update. An optimizer that adds
a state entry later (or changes a dtype) gets a new layout and a fresh slot; nothing is lost.

Note [sharded state]: under FSDP2 a parameter is a DTensor, and so is every state the optimizer
makes like it (``zeros_like``). Only this rank's shard goes to the tier: the buffer holds the local
tensor, and the entry remembers the mesh, placements, global shape and stride, so that
:func:`unpack` hands the optimizer a DTensor again whose local tensor is the view into the buffer.
The optimizer's arithmetic on a DTensor is the same arithmetic on its local tensor (an update is
elementwise), so the bits are those of the plain optimizer on the sharded model, and
``state_dict()`` returns DTensors that DCP can reshard.
"""

from __future__ import annotations

import collections
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from tierflow.offload.core.errors import TierError
from tierflow.offload.core.units import align_up
from tierflow.offload.optim.placement import numa_roles
from tierflow.offload.tiers._memory import MappedMemory, aligned_empty
from tierflow.offload.tiers.numa import discover_numa_nodes, mbind
from tierflow.profiling import local_tensor

__all__ = ["StateEntry", "StateInTiers", "StateLayout", "StagingBuffer", "is_tiered", "layout_of", "local_binding", "pack",
           "predict_state_bytes", "unpack"]

_ALIGN = 64


@dataclass(frozen=True)
class StateEntry:
    """One tensor of one parameter's state inside a sub-group buffer.

    Attributes:
        param_pos: the parameter's position in its sub-group.
        name: the key in ``optimizer.state[p]`` (``exp_avg``...).
        dtype, shape: the tensor's (its local shard's, for a DTensor).
        offset: byte offset in the buffer (64-byte aligned).
        sharding: for a DTensor, ``(device_mesh, placements, global shape, global stride)``
            to wrap the view in again (Note [sharded state]); None for a plain tensor.
    """

    param_pos: int
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    offset: int
    sharding: Optional[Tuple[Any, Tuple[Any, ...], Tuple[int, ...], Tuple[int, ...]]] = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class StateLayout:
    """The buffer layout of one sub-group's tiered state.

    Attributes:
        entries: tiered tensors in buffer order.
        keys: per parameter, every key of its state dict in the optimizer's order (tiered or not).
        nbytes: buffer size (a multiple of the page size, so O_DIRECT reads it in place).
    """

    entries: Tuple[StateEntry, ...]
    keys: Tuple[Tuple[str, ...], ...]
    nbytes: int


def is_tiered(value: Any) -> bool:
    """True for state that goes to a tier: a tensor with more than one element."""
    return isinstance(value, torch.Tensor) and value.numel() > 1


def layout_of(states: Sequence[Mapping[str, Any]]) -> StateLayout:
    """The layout of ``states`` (one state dict per parameter of a sub-group)."""
    entries: List[StateEntry] = []
    offset = 0
    for pos, state in enumerate(states):
        for name, value in state.items():
            if is_tiered(value):
                local = local_tensor(value)
                sharding = None if local is value else \
                    (value.device_mesh, tuple(value.placements), tuple(value.shape), tuple(value.stride()))
                entry = StateEntry(pos, name, local.dtype, tuple(local.shape), offset, sharding)
                entries.append(entry)
                offset = align_up(offset + entry.nbytes, _ALIGN)
    return StateLayout(tuple(entries), tuple(tuple(s.keys()) for s in states), align_up(max(offset, 1)))


def predict_state_bytes(optimizer: torch.optim.Optimizer, group_params: Sequence[Tuple[int, torch.Tensor]]
                        ) -> Optional[int]:
    """The buffer size :func:`layout_of` will give the state of ``group_params`` (``(param_group
    index, parameter)`` of one sub-group), before any state exists: a fresh optimizer of the same
    class and hyperparameters takes one step on meta copies of the parameters, which costs no
    memory. None when that optimizer cannot step on the meta device.
    """
    metas, groups = [], []
    for gi, param in group_params:
        # The shard's shape: the state of a DTensor goes to the tier as its local tensor.
        meta = torch.nn.Parameter(torch.empty_like(local_tensor(param), device="meta"),
                                  requires_grad=param.requires_grad)
        meta.grad = torch.empty_like(meta)
        settings = {k: v for k, v in optimizer.param_groups[gi].items() if k != "params"}
        settings.update({k: False for k in ("foreach", "fused", "capturable") if k in settings})
        if "fused" in settings:
            settings["fused"] = None
        metas.append(meta)
        groups.append({**settings, "params": [meta]})
    try:
        probe = type(optimizer)(groups)
        probe.step()
    except Exception:  # noqa: BLE001 - an optimizer that needs real values: no prediction
        return None
    return layout_of([probe.state[m] for m in metas]).nbytes


def unpack(layout: StateLayout, buffer: torch.Tensor, small: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """State dicts whose tiered tensors are views into ``buffer`` and whose other values come from ``small``."""
    views: Dict[Tuple[int, str], torch.Tensor] = {}
    for e in layout.entries:
        view = buffer[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
        views[(e.param_pos, e.name)] = view if e.sharding is None else _as_dtensor(view, e.sharding)
    states: List[Dict[str, Any]] = []
    for pos, keys in enumerate(layout.keys):
        states.append({k: views[(pos, k)] if (pos, k) in views else small[pos][k] for k in keys})
    return states


def pack(layout: StateLayout, buffer: torch.Tensor, states: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Copy the tiered tensors of ``states`` into ``buffer`` (skipping those already there).

    Returns:
        Per parameter, the values that stay in host memory (the non-tiered ones).
    """
    for e in layout.entries:
        value = local_tensor(states[e.param_pos][e.name])
        view = buffer[e.offset:e.offset + e.nbytes]
        if value.device.type == "cpu" and value.is_contiguous() and value.data_ptr() == view.data_ptr():
            continue  # updated in place in the staging buffer
        view.view(e.dtype).view(e.shape).copy_(value)
    # Small tensors are copied too: a state dict loaded from a live optimizer shares its tensors.
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items() if not is_tiered(v)}
            for state in states]


def _as_dtensor(view: torch.Tensor, sharding: Tuple[Any, Tuple[Any, ...], Tuple[int, ...], Tuple[int, ...]]
                ) -> torch.Tensor:
    """``view`` as the local tensor of a DTensor laid out as ``sharding`` says (Note [sharded state])."""
    from torch.distributed.tensor import DTensor

    mesh, placements, shape, stride = sharding
    return DTensor.from_local(view, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


class StagingBuffer:
    """A page-aligned host buffer a sub-group's state is read into, updated in and written from.

    ``tag`` names the sub-group (and its layout) whose committed state the buffer still holds,
    so a step that needs it next skips the read (Note [staging cache] in ``offload/optim/_pipeline.py``).
    ``busy`` is the write-back in flight from it, which must finish before it is reused.

    Args:
        bind: ``bind(address, nbytes)`` called before the memory is first touched (``mbind`` to the
            NUMA node(s) of the updating CPUs); None leaves placement to the kernel.
    """

    def __init__(self, bind: Optional[Callable[[int, int], None]] = None) -> None:
        self.tensor: Optional[torch.Tensor] = None
        self.tag: Optional[Tuple[int, int]] = None  # (sub-group index, state version)
        self.busy: List[Any] = []  # handles to wait for before the bytes may change
        self.last_used = 0  # for least-recently-used reuse
        self._bind = bind
        self._memory: Optional[MappedMemory] = None

    def ensure(self, nbytes: int) -> torch.Tensor:
        """At least ``nbytes`` of page-aligned memory (reallocated, contents lost, when smaller)."""
        if self.tensor is None or self.tensor.numel() < nbytes:
            self.release()
            if self._bind is not None:
                self._memory = MappedMemory(align_up(nbytes), bind=self._bind)
                self.tensor = self._memory.tensor
            else:
                self.tensor = aligned_empty(align_up(nbytes))
        return self.tensor[:nbytes]

    def release(self) -> None:
        """Give the memory back (after waiting for its transfers); the next ``ensure`` maps it again."""
        self.wait()
        self.tensor, self._memory, self.tag = None, None, None

    def wait(self) -> None:
        """Wait for the transfers on this buffer; their errors are reported by their owner."""
        for handle in self.busy:
            handle.exception()
        self.busy.clear()

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel()


class StateInTiers(collections.defaultdict):
    """``TieredOptimizer.state``: empty, since the state lives in the tiers, but true once any
    state exists there.

    Note [state that is not here]: code asks ``if optimizer.state`` to learn whether an optimizer
    has state yet. DCP's ``get_optimizer_state_dict`` (torchtitan's checkpointer) takes a step with
    zero gradients and a zero learning rate when the answer is no, to create the state; on an
    optimizer that has state that step still moves Adam's moments and its step count. An
    always-empty dict said no after every step, so a save from a user's own loop silently
    changed the state it saved.
    """

    def __init__(self, has_state: Callable[[], bool]) -> None:
        super().__init__(dict)
        self._has_state = has_state

    def __bool__(self) -> bool:
        return len(self) > 0 or self._has_state()


def local_binding(setting: str, sysfs_root: str) -> Tuple[Tuple[int, ...], Optional[Callable[[int, int], None]]]:
    """The NUMA node(s) of the CPUs running the update, and an ``mbind`` to them (Note [local state])."""
    if setting == "off":
        return (), None
    try:
        nodes = discover_numa_nodes(sysfs_root)
    except TierError:
        return (), None
    local, _ = numa_roles(nodes, os.sched_getaffinity(0))
    if len(nodes) < 2 or not local:
        return (), None  # one node: nothing to choose

    def bind(address: int, nbytes: int) -> None:
        mbind(address, nbytes, local)

    try:
        MappedMemory(4096, bind=bind).close()  # the kernel may refuse mbind (container, cpuset)
    except TierError as exc:
        warnings.warn(f"optimizer.tiered.local_numa=auto: {exc}; staging buffers are not bound", stacklevel=3)
        return (), None
    return local, bind
