"""Build a model on the meta device, then materialise it tensor by tensor, bit-identically.

``torch.device("meta")`` builds a model of any size in no memory, but its initialisation never
ran: ``to_empty`` plus an ``init_weights`` of one's own gives other numbers than eager
construction, because the random number generator is consumed in another order. This module
records every operation the constructor issued on the meta device (:func:`record_init`), then
:func:`materialize` replays that program on the CPU in the same order, so the generator is
consumed exactly as eager construction consumes it, and the parameters come out bit-identical.

Memory stays small: an operation that overwrites a whole tensor (``normal_``, ``uniform_``,
``fill_``, ``zero_``, ``copy_``) starts a new *version* of it, and a version lives only from its
first operation to its last use. Most initialisers overwrite what an earlier one wrote (GPT-2's
``_init_weights`` overwrites ``nn.Linear``'s own init), so an earlier version is drawn into a
scratch tensor that dies at once, and only a parameter's final version is kept, from its last
overwrite until :func:`materialize` hands it to ``place`` (the device, or a tier). A tensor the
``source`` provides (weights loaded from a checkpoint) is never drawn at all.

Example:
    >>> model, program = record_init(lambda: GPT(cfg))  # doctest: +SKIP
    >>> materialize(model, program, device=torch.device("cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from tierflow.offload.tiers import trim_freed_memory

__all__ = ["InitProgram", "MaterializeError", "TierPlacement", "WeightSource", "materialize", "record_init"]

#: In-place operations whose result does not depend on the tensor's previous contents.
_OVERWRITES = frozenset({
    "aten::normal_", "aten::uniform_", "aten::fill_", "aten::zero_", "aten::copy_", "aten::random_",
    "aten::bernoulli_", "aten::exponential_", "aten::geometric_", "aten::cauchy_", "aten::log_normal_",
})


class MaterializeError(RuntimeError):
    """The recorded construction cannot be replayed, or a source lacks or mismatches a tensor."""


@dataclass(frozen=True)
class _Ref:
    """A tensor argument of a recorded operation: a view of storage ``token``."""

    token: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass
class _Op:
    func: Any
    args: Any
    kwargs: Any
    outputs: Tuple[int, ...]  # tokens of out-of-place results
    mutates: Optional[int]  # token written in place (args[0]), if any
    overwrites: bool  # ... and the whole storage is overwritten
    fresh: Tuple[int, ...]  # of the outputs, the storages this op created (not views of an input)


@dataclass
class InitProgram:
    """The operations a constructor issued on the meta device, in order (pure data plus op handles).

    Attributes:
        ops: The recorded operations.
        storages: ``token -> (nbytes, dtype)`` of every storage the program touches.
        tokens: ``storage address -> token`` of the meta storages, to find the model's tensors.
        meta_tensors: One tensor per meta storage, kept so that no address is reused while the
            program is alive.
    """

    ops: List[_Op] = field(default_factory=list)
    storages: Dict[int, Tuple[int, torch.dtype]] = field(default_factory=dict)
    tokens: Dict[int, int] = field(default_factory=dict)
    meta_tensors: List[torch.Tensor] = field(default_factory=list)


class _Recorder(TorchDispatchMode):
    def __init__(self, program: InitProgram) -> None:
        super().__init__()
        self.program = program
        self._tokens = program.tokens
        self._keep = program.meta_tensors  # keeps meta storages alive: a freed one's address may come back

    def token(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._tokens:
            self._tokens[key] = len(self._tokens)
            self._keep.append(t)
            self.program.storages[self._tokens[key]] = (storage.nbytes(), t.dtype)
        return self._tokens[key]

    def ref(self, t: torch.Tensor) -> _Ref:
        return _Ref(self.token(t), tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in (*args, *kwargs.values()):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                raise MaterializeError(f"the constructor used a {t.device.type} tensor in {func}; build it under "
                                       "torch.device('meta') only (create constants there too)")
        schema = func._schema
        mutated = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        mutates = self.token(args[0]) if mutated and isinstance(args[0], torch.Tensor) else None
        overwrites = mutates is not None and schema.name in _OVERWRITES and \
            args[0].untyped_storage().nbytes() == args[0].numel() * args[0].element_size()
        rec_args = tree_map(lambda a: self.ref(a) if isinstance(a, torch.Tensor) else a, args)
        rec_kwargs = tree_map(lambda a: self.ref(a) if isinstance(a, torch.Tensor) else a, kwargs)
        outputs: Tuple[int, ...] = ()
        fresh: Tuple[int, ...] = ()
        if mutates is None:
            flat = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
            known = len(self._tokens)
            outputs = tuple(self.token(o) for o in flat)
            fresh = tuple(t for t in outputs if t >= known)
        self.program.ops.append(_Op(func, rec_args, rec_kwargs, outputs, mutates, overwrites, fresh))
        return out


# Note [constants from data]: ``torch.tensor([1.5])`` (and ``as_tensor``/``asarray`` of Python or
# NumPy data) under ``torch.device("meta")`` makes a meta tensor without issuing any operation, so
# its values would be lost, and a parameter or buffer built from it could not be materialised
# (``nn.Parameter(torch.tensor([1.0]))``, a buffer of constants). A function mode sees these calls
# first: it builds the value on the CPU (it is small: it was written out as data), records it as
# an operation that produces a copy of it, and gives the constructor a meta tensor of that shape.
# Replay then starts from the very same value. A call with an explicit non-meta device, or one
# whose data holds tensors, is left alone (the recorder names a real tensor if one is used).
_FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)


class _Constant:
    """A recorded operation that produces a copy of a value the constructor wrote as data."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __call__(self) -> torch.Tensor:
        return self.value.clone()

    def __repr__(self) -> str:
        return f"constant{tuple(self.value.shape)}"


class _Constants(TorchFunctionMode):
    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func not in _FROM_DATA or (device is not None and torch.device(device).type != "meta") or \
                any(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)
        grad = bool(kwargs.pop("requires_grad", False))
        with _disable_current_modes():
            value = func(*args, **{**kwargs, "device": "cpu"})
            out = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        tok = self.recorder.token(out)
        self.recorder.program.ops.append(_Op(_Constant(value), (), {}, (tok,), None, False, (tok,)))
        return out.requires_grad_(grad)


def record_init(build: Callable[[], nn.Module]) -> Tuple[nn.Module, InitProgram]:
    """Run ``build()`` on the meta device and record the program its initialisation issued.

    Args:
        build: Constructs the model (called once, under ``torch.device("meta")``).

    Returns:
        The meta model and its :class:`InitProgram`.

    Raises:
        MaterializeError: the constructor mixed in real tensors.
    """
    program = InitProgram()
    recorder = _Recorder(program)
    with torch.device("meta"), recorder, _Constants(recorder):  # Note [constants from data]
        model = build()
    return model, program


class WeightSource:
    """Where loaded weights come from (a safetensors directory, a DCP checkpoint): by state-dict name."""

    def names(self) -> Set[str]:
        raise NotImplementedError

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The tensor ``name`` as a CPU tensor shaped and typed like ``like`` (a meta tensor)."""
        raise NotImplementedError


def _final_tensors(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str, str, bool]]]:
    """``storage address -> [(owner module, attribute, full name, is_parameter)]`` (tied tensors share one)."""
    out: Dict[int, List[Tuple[nn.Module, str, str, bool]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(p.untyped_storage()._cdata, []).append(
                    (module, attr, f"{mod_name}.{attr}" if mod_name else attr, True))
        for attr, b in module._buffers.items():
            if b is not None:
                out.setdefault(b.untyped_storage()._cdata, []).append(
                    (module, attr, f"{mod_name}.{attr}" if mod_name else attr, False))
    return out


def materialize(model: nn.Module, program: InitProgram, *, device: torch.device = torch.device("cpu"),
                source: Optional[WeightSource] = None,
                place: Optional[Callable[[str, torch.Tensor], Optional[torch.Tensor]]] = None,
                dtype: Optional[torch.dtype] = None) -> Dict[str, int]:
    """Give every meta parameter and buffer of ``model`` its real value, one tensor at a time.

    Tensors ``source`` names are read from it; every other one is computed by replaying
    ``program`` on the CPU, in recorded order, so the CPU generator is consumed as eager
    construction consumes it (ops on tensors the source provides are skipped, which changes
    what later random draws give only when loaded and drawn tensors interleave; a model whose
    every parameter is loaded is unaffected).

    Args:
        model: The meta model from :func:`record_init`.
        program: Its recorded program.
        device: Where parameters end up unless ``place`` keeps them elsewhere.
        source: Loaded weights by state-dict name (None: initialise everything).
        place: Called as ``place(name, tensor)`` once per final tensor, as soon as it is complete;
            returns the tensor the model should hold (e.g. an empty storage whose bytes now wait
            in a tier), or None to keep ``tensor`` moved to ``device``. A ``place`` whose
            ``parameters_only`` attribute is True is called for parameters only.
        dtype: Floating-point tensors are cast to it once computed or loaded, before ``place``
            (``model.to(dtype)`` after eager construction gives the same values; a buffer computed
            from a *loaded* weight sees the cast weight).

    Returns:
        ``{"computed": n, "loaded": n, "scratch_draws": n, "peak_live_bytes": n}``.

    Raises:
        MaterializeError: a source tensor has another shape or dtype, or the program reads a tensor
            before anything wrote it.
    """
    tokens = program.tokens
    owners = _final_tensors(model)
    final: Dict[int, List[Tuple[nn.Module, str, str, bool]]] = {tokens[a]: o for a, o in owners.items() if a in tokens}
    missing = [o[0][2] for a, o in owners.items() if a not in tokens]
    if missing:
        raise MaterializeError(f"{len(missing)} tensors were not created while recording (first: {missing[0]}); "
                               "build the whole model inside record_init")
    loaded: Set[int] = set()
    if source is not None:
        have = source.names()
        for tok, where in final.items():
            if any(name in have for _, _, name, _ in where):
                loaded.add(tok)
    # Versions: a token gets a new version where an op defines it (creates it, or overwrites it
    # whole); a version ends at its last use before the next definition. Only the version that
    # starts at a final tensor's last definition is the tensor; every earlier one is scratch.
    uses: Dict[int, List[int]] = {}
    defines: Dict[int, Set[int]] = {}
    for i, op in enumerate(program.ops):
        for tok in dict.fromkeys(_tokens_of(op)):
            uses.setdefault(tok, []).append(i)
        for tok in ((op.mutates,) if op.overwrites else op.fresh):
            defines.setdefault(i, set()).add(tok)
    version_end: Dict[int, List[int]] = {}
    last_define: Dict[int, int] = {}
    for tok, at in uses.items():
        for k, i in enumerate(at):
            if tok in defines.get(i, ()):
                last_define[tok] = i
            nxt = at[k + 1] if k + 1 < len(at) else None
            if nxt is None or tok in defines.get(nxt, ()):
                version_end.setdefault(i, []).append(tok)
    env: Dict[int, torch.Tensor] = {}
    live = peak = draws = 0
    cpu = torch.device("cpu")
    done: Dict[int, torch.Tensor] = {}

    def meta_of(tok: int) -> torch.Tensor:
        module, attr, _, is_param = final[tok][0]
        return module._parameters[attr] if is_param else module._buffers[attr]

    params_only = bool(getattr(place, "parameters_only", False))

    def finish(tok: int, tensor: torch.Tensor) -> None:
        where = final[tok]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        kept = place(where[0][2], tensor) if place is not None and (where[0][3] or not params_only) else None
        if kept is None:
            kept = tensor.to(device)
        done[tok] = kept
        if where[0][3]:  # one Parameter object for every owner: tied weights stay tied
            kept = nn.Parameter(kept, requires_grad=where[0][0]._parameters[where[0][1]].requires_grad)
        for module, attr, _, is_param in where:
            (module._parameters if is_param else module._buffers)[attr] = kept

    names = source.names() if source is not None else set()
    for tok in sorted(loaded):  # loaded tensors never run their init ops
        like = meta_of(tok)
        name = next(n for _, _, n, _ in final[tok] if n in names)
        tensor = source.read(name, like)
        if tuple(tensor.shape) != tuple(like.shape) or tensor.dtype != like.dtype:
            raise MaterializeError(f"{name}: the source holds {tuple(tensor.shape)} {tensor.dtype}, the model expects "
                                   f"{tuple(like.shape)} {like.dtype}")
        finish(tok, tensor)
        del tensor
    with torch.no_grad():
        for i, op in enumerate(program.ops):
            touched = set(_tokens_of(op))
            if (op.mutates is not None and op.mutates in loaded) or touched <= loaded:
                continue  # the init of a loaded tensor (or a view of one): its value comes from the source
            for tok in touched & loaded:  # read to compute another tensor (a buffer derived from a weight)
                if tok not in env:
                    env[tok] = _loaded_value(tok, done[tok], final[tok][0][2], place)
            if op.mutates is not None and op.overwrites:
                nbytes, storage_dtype = program.storages[op.mutates]
                if op.mutates in env:
                    live -= env.pop(op.mutates).untyped_storage().nbytes()
                env[op.mutates] = torch.empty(nbytes // storage_dtype.itemsize, dtype=storage_dtype, device=cpu)
                live += nbytes
                draws += int(last_define.get(op.mutates) != i or op.mutates not in final)
            args = tree_map(lambda a: _view(env, a) if isinstance(a, _Ref) else a, op.args)
            kwargs = tree_map(lambda a: _view(env, a) if isinstance(a, _Ref) else a, op.kwargs)
            kwargs = {k: (cpu if k == "device" else v) for k, v in kwargs.items()}
            out = op.func(*args, **kwargs)
            if op.outputs:
                flat = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
                for tok, o in zip(op.outputs, flat):
                    if tok not in env:  # a fresh storage (an output that views an input keeps the input's)
                        env[tok] = o
                        live += o.untyped_storage().nbytes()
            peak = max(peak, live)
            for tok in version_end.get(i, ()):
                if tok not in env:
                    continue
                if tok in final and tok not in loaded and last_define.get(tok, -1) <= i and tok not in done:
                    meta = meta_of(tok)
                    finish(tok, env[tok].as_strided(meta.shape, meta.stride(), meta.storage_offset()))
                live -= env.pop(tok).untyped_storage().nbytes()
    untouched = [tok for tok in final if tok not in done]
    for tok in untouched:  # created but never written (torch.empty in the constructor): uninitialised, as eagerly
        finish(tok, torch.empty_like(meta_of(tok), device=cpu))
    return {"computed": len(done) - len(loaded) - len(untouched), "loaded": len(loaded), "scratch_draws": draws,
            "peak_live_bytes": peak, "uninitialised": len(untouched)}


def _loaded_value(tok: int, held: torch.Tensor, name: str, place: Any) -> torch.Tensor:
    if held.untyped_storage().nbytes() >= held.numel() * held.element_size():
        return held.detach().to("cpu")
    if hasattr(place, "read"):  # it waits in a tier: bring this one tensor back
        return place.read(name)
    raise MaterializeError(f"the constructor computes from {name}, which the place callback kept without its data; "
                           "return the tensor from place, or give place a read(name) method")


def _tokens_of(op: _Op) -> Sequence[int]:
    toks: List[int] = []
    tree_map(lambda a: toks.append(a.token) if isinstance(a, _Ref) else a, (op.args, op.kwargs))
    return [*toks, *op.outputs]


def _view(env: Dict[int, torch.Tensor], ref: _Ref) -> torch.Tensor:
    base = env.get(ref.token)
    if base is None:
        raise MaterializeError(f"the constructor reads tensor {ref.token} before writing it; "
                               "it cannot be replayed bit-identically")
    flat = base if base.dtype == ref.dtype else base.view(ref.dtype) if base.dim() else base.reshape(1).view(ref.dtype)
    return flat.as_strided(ref.size, ref.stride, ref.offset)


class TierPlacement:
    """A ``place`` for :func:`materialize` that writes every tensor into a tier as soon as it is complete.

    The model keeps each parameter's shape and dtype over an empty storage (``resize_(0)``), the way
    the runtime holds a tensor that waits in a tier; :meth:`read` brings one back. So a model larger
    than memory is built or loaded with one tensor in memory at a time.

    Args:
        tier: An open tier (NVMe, NUMA or host).
        parameters_only: Place parameters only; buffers go to the device (what
            :meth:`~tierflow.offload.OffloadRuntime.adopt` takes over).

    Example:
        >>> placement = TierPlacement(engine.tiers["nvme"])  # doctest: +SKIP
        >>> materialize(model, program, source=SafetensorsSource(path), place=placement)  # doctest: +SKIP
    """

    def __init__(self, tier: Any, parameters_only: bool = False) -> None:
        self.tier, self.parameters_only = tier, parameters_only
        self.slots: Dict[str, Tuple[Any, torch.Size, torch.dtype]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        trim_freed_memory()  # the tensors placed before this one are gone: give their memory back
        src = tensor.detach().contiguous()
        self.write(name, src)
        held = torch.empty(src.shape, dtype=src.dtype)
        held.untyped_storage().resize_(0)
        return held

    def write(self, name: str, src: torch.Tensor) -> None:
        """Copy the contiguous ``src`` into a new slot of the tier, kept under ``name``; waits, so
        ``src``'s memory may be reused or freed as soon as this returns."""
        slot = self.tier.reserve(src.numel() * src.element_size())
        self.tier.write(slot, src).wait()
        self.slots[name] = (slot, src.shape, src.dtype)

    def read(self, name: str) -> torch.Tensor:
        """The tensor placed under ``name``, read back into a new CPU tensor."""
        slot, shape, dtype = self.slots[name]
        out = torch.empty(shape, dtype=dtype)
        self.tier.read(slot, out).wait()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes placed in the tier."""
        return sum(int(torch.Size(shape).numel()) * dtype.itemsize for _, shape, dtype in self.slots.values())

    def free(self) -> None:
        """Free every slot (the model's placeholders are then meaningless)."""
        for slot, _, _ in self.slots.values():
            self.tier.free(slot)
        self.slots.clear()
