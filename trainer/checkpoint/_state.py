"""What a snapshot contains, and putting it back.

A snapshot is a flat list of named tensors plus a small picklable *meta* dict. The tensors are
captured by reference (no copy: the copy happens later, in the background) and named in a way
that does not depend on the world size or on Python object ids:

* ``model.<name>``: every entry of ``model.state_dict()`` (parameters and persistent buffers);
* ``optim.<param name>.<state name>``: every tensor of ``optimizer.state_dict()["state"]``,
  re-keyed from the optimizer's integer ids to the parameter's name.

The meta holds the rest: the step (which is also the data position, batches being a pure
function of the step), the optimizer's param groups (parameter names instead of ids) and
non-tensor state, the LR scheduler, the RNG states (python, numpy, torch CPU and CUDA), the
config hash and the payload layout. The same naming is used in memory and in the
torch.distributed.checkpoint files, so one restore path serves both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from tierflow.profiling import local_tensor
from tierflow.trainer.checkpoint._codec import decode, encode
from tierflow.trainer.checkpoint._format import align

__all__ = ["Captured", "ModuleState", "StateSource", "TensorEntry", "apply_state", "capture", "capture_rng", "host_copy",
           "layout", "meta_from_bytes", "meta_to_bytes", "optimizer_param_names", "restore_rng", "views_from_payload"]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a snapshot's payload."""

    key: str
    dtype: str  # e.g. "float32" (torch dtype name without the prefix)
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class Captured:
    """A snapshot before its copy: tensor *references* and the already-copied small meta."""

    step: int
    tensors: List[Tuple[str, torch.Tensor]]
    meta: Dict[str, Any]


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Parameter names in the optimizer's id order (the ids ``optimizer.state_dict()`` uses).

    Raises:
        ValueError: the optimizer holds a tensor that is not a parameter of ``model``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the model; "
                                 "snapshots name optimizer state by parameter name, so build the optimizer "
                                 "from model.parameters()")
            out.append(names[id(p)])
    return out


def capture_rng() -> Dict[str, Any]:
    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in state["cuda"]])


def capture(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
            config_hash: str) -> Captured:
    """References to every tensor of the training state, and a copy of the small rest.

    Cheap (no tensor is copied): call it right after ``scheduler.step()``. The tensors must not be
    mutated until the background copy says it is safe (the optimizer step pre-hook waits for it).
    """
    shards: Dict[str, List[int]] = {}
    tensors: List[Tuple[str, torch.Tensor]] = [(f"model.{k}", _local(f"model.{k}", v, shards))
                                               for k, v in model.state_dict().items()]
    names = optimizer_param_names(model, optimizer)
    sd = optimizer.state_dict()  # references to the live state tensors, not copies
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, per_param in sd["state"].items():
        fqn = names[pid]
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors.append((f"optim.{fqn}.{key}", _local(f"optim.{fqn}.{key}", value, shards)))
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    meta = {"step": step, "config_hash": config_hash, "param_groups": groups, "optim_scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": capture_rng()}
    if shards:
        meta["shards"] = shards
    return Captured(step, tensors, meta)


def _local(name: str, value: torch.Tensor, shards: Dict[str, List[int]]) -> torch.Tensor:
    """Note [sharded snapshots]: a DTensor (FSDP2) is captured as this rank's shard, its full shape
    kept in ``shards``; a persisted copy writes it as a DTensor again, so DCP records where each
    shard sits and a copy loads at any world size (:func:`shard_rows` takes a rank's rows back)."""
    local = local_tensor(value)
    if local is value:
        return value.detach()
    placements = tuple(value.placements)
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(f"{name} is a DTensor placed {placements}: snapshots take parameters and states sharded "
                         "on dimension 0 over one mesh dimension (fully_shard's default)")
    shards[name] = list(value.shape)
    return local.detach()


def shard_rows(num_rows: int, world_size: int, rank: int) -> Tuple[int, int]:
    """The rows ``[start, stop)`` of dimension 0 that ``rank`` holds when ``num_rows`` are sharded
    over ``world_size`` ranks the way ``fully_shard`` does (``torch.chunk``: ceil-sized chunks, the
    last ones shorter or empty)."""
    chunk = -(-num_rows // world_size) if num_rows else 0
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def _into_shard(live: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (this rank's shard, or the full tensor a persisted copy loads) as ``live``'s local shard."""
    local = local_tensor(live)
    if value.shape == local.shape:
        return value
    if tuple(value.shape) != tuple(live.shape):
        raise ValueError(f"a sharded tensor of shape {tuple(live.shape)} (local {tuple(local.shape)}) cannot take "
                         f"one of shape {tuple(value.shape)}; restore with the model it was saved from")
    mesh = live.device_mesh
    start, stop = shard_rows(live.shape[0], mesh.size(), mesh.get_local_rank())
    return value[start:stop]


def layout(tensors: Sequence[Tuple[str, torch.Tensor]]) -> Tuple[List[TensorEntry], int]:
    """Offsets of each tensor in the payload (64-byte aligned) and the payload length."""
    entries, offset = [], 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(key, str(t.dtype).replace("torch.", ""), tuple(t.shape), offset, nbytes))
        offset = align(offset + nbytes)
    return entries, offset


def meta_to_bytes(meta: Dict[str, Any], entries: Sequence[TensorEntry]) -> bytes:
    """A snapshot's meta and payload layout as JSON (Note [no pickles] in ``_codec``)."""
    return encode({**meta, "layout": [(e.key, e.dtype, tuple(e.shape), e.offset, e.nbytes) for e in entries]})


def meta_from_bytes(data: bytes) -> Dict[str, Any]:
    """What :func:`meta_to_bytes` wrote, its ``layout`` as TensorEntry again.

    Raises:
        ValueError: not such bytes.
    """
    meta = decode(data)
    if not isinstance(meta, dict) or not isinstance(meta.get("layout"), list):
        raise ValueError("the snapshot's metadata has no layout")
    meta["layout"] = [TensorEntry(*e) for e in meta["layout"]]
    return meta


def views_from_payload(entries: Sequence[TensorEntry], payload: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Typed views (no copy) of each tensor in a uint8 ``payload`` tensor."""
    out = {}
    for e in entries:
        dtype = getattr(torch, e.dtype)
        out[e.key] = payload[e.offset:e.offset + e.nbytes].view(dtype).view(e.shape)
    return out


def apply_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, tensors: Dict[str, torch.Tensor],
                meta: Dict[str, Any], *, rng: Optional[Dict[str, Any]]) -> int:
    """Load a snapshot into live objects; returns the step it was taken after.

    Tensors are copied (never aliased), so ``tensors`` may be views of shared memory that a later
    snapshot overwrites; optimizer state that already exists is overwritten in place.

    Raises:
        ValueError: the snapshot does not match the model (a missing or extra parameter).
    """
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    live = model.state_dict()  # detached tensors sharing the parameters' storage
    for k, v in live.items():  # Note [sharded snapshots]: a sharded entry takes its local shard
        if _is_dtensor(v) and k in model_sd:
            model_sd[k], live[k] = _into_shard(v, model_sd[k]), local_tensor(v)
    if live.keys() == model_sd.keys() and all(_same_layout(live[k], v) for k, v in model_sd.items()):
        missing, unexpected = [], []
        for k, v in model_sd.items():
            host_copy(live[k], v)
    else:  # other devices, dtypes or keys: torch's own loader casts and reports
        missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"the snapshot does not match the model (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}); restore it with the configuration it was taken with")
    names = optimizer_param_names(model, optimizer)
    ids = {n: i for i, n in enumerate(names)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        fqn, _, name = key[len("optim."):].rpartition(".")
        param = params[ids[fqn]]
        existing = optimizer.state.get(param, {}).get(name)
        if _is_dtensor(param) and value.dim() > 0:  # a state shaped like its sharded parameter
            state.setdefault(ids[fqn], {})[name] = _sharded_state(param, value, existing)
            continue
        state.setdefault(ids[fqn], {})[name] = _own_copy(value, existing)
    for fqn, scalars in meta["optim_scalars"].items():
        state.setdefault(ids[fqn], {}).update(scalars)
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if rng is not None:
        restore_rng(rng)
    return int(meta["step"])


def _is_dtensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and local_tensor(t) is not t


def _sharded_state(param: torch.Tensor, value: torch.Tensor, existing: Any) -> torch.Tensor:
    """An optimizer state of a sharded parameter: a DTensor laid out like it, this rank's rows copied in."""
    from torch.distributed.tensor import DTensor

    rows = _into_shard(param, value)
    if _is_dtensor(existing):
        host_copy(local_tensor(existing), rows)
        return existing
    return DTensor.from_local(rows.clone().to(param.device), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _own_copy(value: torch.Tensor, live: Any) -> torch.Tensor:
    """``value`` in memory the optimizer owns: the live state tensor, overwritten in place, when it
    has the same shape, dtype and layout (no allocation, one memcpy), else a fresh clone.

    Optimizer.load_state_dict keeps same-dtype CPU tensors as they are (and Adam's ``step`` on
    any device), so handing it ``value`` itself would alias the snapshot buffer.
    """
    if isinstance(live, torch.Tensor) and _same_layout(live, value):
        return host_copy(live, value)
    return value.clone()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device.type == "cpu" and b.device.type == "cpu"
            and a.is_contiguous() and b.is_contiguous())


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for contiguous host tensors of one dtype, on this thread alone.

    Note [single-threaded host copies]: a torch copy runs on the intra-op thread pool; when the
    cores are shared (other ranks, other jobs) one descheduled pool thread holds up the whole
    copy, which made restores ~10x slower on a loaded machine. A memcpy through numpy runs at
    full speed on one core and releases the GIL.
    """
    if not _same_layout(dst, src) or dst.numel() == 0:
        with torch.no_grad():
            return dst.copy_(src)
    np.copyto(dst.detach().reshape(-1).view(torch.uint8).numpy(), src.detach().reshape(-1).view(torch.uint8).numpy())
    return dst


class StateSource(Protocol):
    """What a snapshot is taken of and restored into (one rank's training state).

    ``capture`` takes references (the copy happens later, in the background); ``apply`` puts a
    snapshot back and returns its step; ``mutating_optimizers`` are the torch optimizers whose
    ``step`` changes captured tensors: the snapshotter waits for its copy in their step pre-hook.
    """

    def capture(self, step: int, config_hash: str) -> Captured: ...

    def apply(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], *, rng: Optional[Dict[str, Any]]) -> int: ...

    def mutating_optimizers(self) -> List[torch.optim.Optimizer]: ...


class ModuleState:
    """A plain (or DDP-wrapped) ``nn.Module`` with a torch optimizer and an optional LR scheduler."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def capture(self, step: int, config_hash: str) -> Captured:
        return capture(self.model, self.optimizer, self.scheduler, step, config_hash)

    def apply(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], *, rng: Optional[Dict[str, Any]]) -> int:
        return apply_state(self.model, self.optimizer, self.scheduler, tensors, meta, rng=rng)

    def mutating_optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.optimizer]
