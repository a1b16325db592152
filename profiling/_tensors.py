"""What the tracer sees of tensors: their storages, the tensors inside arguments, every operation.

Kept apart from the tracer's bookkeeping so the dispatch hot path is small and easy to audit.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LIFT_OPS", "DispatchRecorder", "dispatch_round_trip_s", "flat_tensors", "held_storage", "is_fake_dispatch",
           "local_tensor", "remove_hooks", "storage_of"]

# Ops whose tensor argument is a freshly made tensor (torch.tensor(...)), not an existing input.
LIFT_OPS = frozenset({torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default})
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def is_fake_dispatch(types: Any) -> bool:
    """Note [fake tensors pass]: an operation on FakeTensors holds no memory and reads none.

    DTensor (FSDP2's sharded parameters) propagates shardings by running each new operation on
    FakeTensors under a FakeTensorMode; a FakeTensor returns NotImplemented while another mode is
    active, so a mode that also declined would fail the operation, and one that acted (a copy of
    its own) would hand a real tensor to the fake mode. Modes run these straight through instead.
    """
    return any(issubclass(t, FakeTensor) for t in types) or \
        torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


class DispatchRecorder(TorchDispatchMode):
    """Forwards every operation to the tracer (kept separate so the tracer is not itself a mode)."""

    def __init__(self, on_op: Callable[..., Any]) -> None:
        super().__init__()
        self._on_op = on_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105 (torch's protocol)
        if is_fake_dispatch(types):
            return func(*args, **(kwargs or {}))
        if any(t not in _PLAIN_TENSOR_TYPES for t in types):
            return NotImplemented  # let tensor subclasses desugar; their inner ops come back here
        return self._on_op(func, args, kwargs or {})


def flat_tensors(obj: Any, out: List[torch.Tensor]) -> List[torch.Tensor]:
    """Append every tensor inside ``obj`` (nested lists, tuples, dict values) to ``out``; return ``out``."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            flat_tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            flat_tensors(item, out)
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding ``t``'s bytes on this process: a DTensor's local shard, else ``t`` itself.

    Note [local shards]: a DTensor (FSDP2's sharded parameters, their gradients and the optimizer
    states made from them) is a wrapper whose own storage holds nothing; its bytes live in its
    local tensor, the shard this rank owns. Every lookup of a parameter's, gradient's or state's
    storage or size goes through here, so the tracer and the runtime key, count and move the shard.
    """
    local = getattr(t, "_local_tensor", None) if type(t) not in _PLAIN_TENSOR_TYPES else None
    return local if isinstance(local, torch.Tensor) else t


def held_storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage of :func:`local_tensor` (Note [local shards])."""
    return local_tensor(t).untyped_storage()


def storage_of(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    """The tensor's storage when it holds real memory (not meta, sparse or empty), else None."""
    if t.device.type == "meta" or t.is_sparse:
        return None
    try:
        st = held_storage(t)
    except (RuntimeError, NotImplementedError):
        return None
    return st if st.nbytes() else None


def dispatch_round_trip_s(num_rounds: int = 16, repeats: int = 5) -> float:
    """Seconds a dispatch-mode round trip adds to one operation, measured on this machine now.

    Every operation under the tracer leaves C++ for Python and comes back (its tensors wrapped as
    Python objects on the way); that cost is invisible from inside ``__torch_dispatch__``, so the
    tracer subtracts this estimate per operation from the compute it measures. The workload is a
    miniature training step (layer norm, matmuls, activation, loss, backward, in-place update) on
    tensors so small that the kernels cost next to nothing; the minimum over repeats filters out
    interruptions.
    """
    gen = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(8, 8, generator=gen).requires_grad_() for _ in range(2))
    x = torch.randn(4, 8, generator=gen)
    count = [0]

    def step() -> None:
        for _ in range(num_rounds):
            h = torch.nn.functional.layer_norm(x, (8,))
            loss = torch.nn.functional.gelu(h @ w1).matmul(w2).square().mean()
            loss.backward()
            with torch.no_grad():
                for w in (w1, w2):
                    w.sub_(w.grad, alpha=1e-3)
                    w.grad = None

    def counting(func: Any, args: Any, kwargs: Any) -> Any:
        count[0] += 1
        return func(*args, **kwargs)

    def timed(mode: bool) -> float:
        start = time.perf_counter()
        if mode:
            with DispatchRecorder(counting):
                step()
        else:
            step()
        return time.perf_counter() - start

    timed(True)  # the first use of a mode pays one-off setup
    plain, moded = [], []
    for _ in range(repeats):
        plain.append(timed(False))
        count[0] = 0
        moded.append(timed(True))
    return max(min(moded) - min(plain), 0.0) / max(count[0], 1)


def remove_hooks(handles: List[Any]) -> None:
    """Remove every hook of ``handles`` and empty the list.

    Note [hooks that keep a graph]: a per-call multi-grad hook that waits for all of a call's
    tensors holds their grad_fns, and each grad_fn holds the hook: a cycle through C++ that
    Python's collector cannot see, so the step's whole autograd graph stays alive until the hook
    is removed (the runtime's executor kept every step's graph: RSS grew 0.7 MiB a step on a small
    GPT, 290 MiB in 400 steps). The tracer and the executor remove theirs at every iteration's end.
    """
    for handle in handles:
        handle.remove()
    handles.clear()
