"""How a trace names what happens inside one iteration: module calls and the tensors they save.

Shared by the tracer (which records the names) and the offload runtime (which must find the same
names on a live iteration to act on a plan): one implementation, so the two can never disagree on
``module[call]:saved<i>``.

Note [saved-tensor keys]: a saved tensor belongs to the innermost module call running when
autograd saves it; outside every module call (the loss, say) it belongs to ``<outside>`` with the
index of the last finished call of the model. ``i`` counts, per module call, only storages that
become activations there: a parameter, an input, or a storage saved earlier takes no number. The
caller decides that (it knows what it has seen); this class only keeps the stack and the counts.

Note [parameter storages]: a tensor saved on a storage a module's parameters live in is never an
activation and takes no number, even when that storage is not the one the parameter had when
tracing began: DeepSpeed ZeRO-3 gathers a module's parameters into a buffer just before the
module runs (its pre-forward hook, registered before ours) and points ``param.data`` there. The
tracer sees such a buffer as an input that existed before the iteration, or as a fresh
allocation, depending on whether DeepSpeed reuses it; the runtime cannot tell either way. Both
call :meth:`ModuleCalls.note_parameters` when a module starts (and again for the saving module
before numbering: a parameter may be gathered after our pre-hook ran) and ask
:meth:`ModuleCalls.is_parameter_storage` before numbering, so they agree.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from tierflow.profiling.trace import OUTSIDE_PATH, ROOT_PATH, activation_key

__all__ = ["ModuleCalls", "ParamNames", "StorageMap", "own_parameters"]

_PLAIN_PARAMETERS = (torch.Tensor, nn.Parameter)


def own_parameters(module: Optional[nn.Module]) -> List[torch.Tensor]:
    """The parameters registered on ``module`` itself *now* (not its children's).

    Read at every call, never cached: FSDP2 registers the gathered (unsharded) parameters on a
    module for its forward and swaps the sharded ones back after, so the objects change. Tensor
    subclasses (a sharded DTensor) are skipped: autograd never saves their wrapper's storage.
    """
    if module is None:
        return []
    return [p for p in module._parameters.values() if p is not None and type(p) in _PLAIN_PARAMETERS]


class ParamNames:
    """A parameter's name in the model, as ``named_parameters`` gives it; one the optimizer steps
    that the model does not hold is named ``<optimizer>.param<N>``."""

    def __init__(self, model: nn.Module) -> None:
        self._names = {id(p): n for n, p in model.named_parameters()}

    def __call__(self, param: torch.Tensor) -> str:
        name = self._names.get(id(param))
        if name is None:
            name = self._names[id(param)] = f"<optimizer>.param{len(self._names)}"
        return name


class StorageMap:
    """Values keyed by storage identity, never by a dead storage's recycled ``id``.

    ``id(storage)`` alone is not an identity: once a storage dies (ZeRO-3 frees every gathered
    parameter buffer after its module ran), a new storage, an activation say, may get the same
    ``id``. A map that kept only ids would take that activation for a parameter and skip its
    number, so the iteration looked divergent at random. Each entry keeps a weak reference and
    a lookup matches only the very storage it was made for.

    Example:
        >>> st = torch.zeros(2).untyped_storage()
        >>> m = StorageMap({st: "w"})
        >>> st in m, m.get(st), torch.zeros(2).untyped_storage() in m
        (True, 'w', False)
    """

    def __init__(self, items: Iterable[Tuple[torch.UntypedStorage, Any]] | Dict[Any, Any] = ()) -> None:
        self._refs: Dict[int, Tuple[Any, Any]] = {}
        for st, value in (items.items() if isinstance(items, dict) else items):
            self.add(st, value)

    def add(self, storage: torch.UntypedStorage, value: Any = None) -> None:
        self._refs[id(storage)] = (weakref.ref(storage), value)

    def get(self, storage: torch.UntypedStorage, default: Any = None) -> Any:
        entry = self._refs.get(id(storage))
        return entry[1] if entry is not None and entry[0]() is storage else default

    def __contains__(self, storage: torch.UntypedStorage) -> bool:
        entry = self._refs.get(id(storage))
        return entry is not None and entry[0]() is storage

    def discard(self, storage: torch.UntypedStorage) -> None:
        """Forget ``storage`` (nothing happens when it is not in the map)."""
        if storage in self:
            del self._refs[id(storage)]


class ModuleCalls:
    """The module-call stack of one iteration and the saved-tensor numbering of each call.

    Example:
        >>> calls = ModuleCalls()
        >>> calls.enter("blocks.0", calls.next_call("blocks.0"))
        >>> calls.next_saved_key()
        'blocks.0[0]:saved0'
        >>> calls.exit("blocks.0")
        0
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: a new iteration starts."""
        self._calls: Dict[str, int] = defaultdict(int)
        self._saved: Dict[Tuple[str, int], int] = defaultdict(int)
        self.stack: List[Tuple[str, int]] = []
        self.root_calls_done = 0
        self._param_storages = StorageMap()  # Note [parameter storages]

    def note_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Remember the storages ``params`` live in now (call when their module starts)."""
        for p in params:
            if p.device.type != "meta":
                st = p.untyped_storage()
                if st.nbytes():
                    self._param_storages.add(st)

    def is_parameter_storage(self, storage: torch.UntypedStorage) -> bool:
        """True when ``storage`` held a module's parameters when that module started."""
        return storage in self._param_storages

    def next_call(self, path: str) -> int:
        """The call index of the next forward call of ``path`` in this iteration (0, 1, ...)."""
        call = self._calls[path]
        self._calls[path] = call + 1
        return call

    def enter(self, path: str, call: int) -> None:
        """A module's forward starts."""
        self.stack.append((path, call))

    def exit(self, path: str) -> int:
        """A module's forward ended; returns its call index.

        Frames of inner modules that raised (and so skipped their own exit) are dropped too.
        """
        while self.stack and self.stack[-1][0] != path:
            self.stack.pop()
        call = self.stack.pop()[1] if self.stack else 0
        if path == ROOT_PATH:
            self.root_calls_done += 1
        return call

    def owner(self) -> Tuple[str, int]:
        """``(module path, call)`` a tensor saved now belongs to (Note [saved-tensor keys])."""
        return self.stack[-1] if self.stack else (OUTSIDE_PATH, max(self.root_calls_done - 1, 0))

    def next_saved_key(self) -> str:
        """Key of the next activation of the current owner; advances its count."""
        path, call = self.owner()
        saved = self._saved[(path, call)]
        self._saved[(path, call)] = saved + 1
        return activation_key(path, call, saved)
