"""Every private PyTorch API the tracer relies on, in one place.

These calls are not covered by PyTorch's compatibility promise; keeping them behind these few
functions means a PyTorch upgrade that moves one breaks (and is fixed) here, not all over the
tracer.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["checkpoint_generator", "current_graph_task_id", "dispatch_mode_stack", "fsdp2_gathered_tensors",
           "outer_saved_tensors_hooks", "queue_backward_callback"]


def current_graph_task_id() -> int:
    """The id of the autograd graph task running on this thread, -1 outside backward."""
    return torch._C._current_graph_task_id()


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the current backward graph task has finished (call from inside it)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def outer_saved_tensors_hooks() -> Optional[Tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]]:
    """The innermost ``saved_tensors_hooks`` pair active now, or None (ours then wraps it)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def dispatch_mode_stack() -> List[Any]:
    """The TorchDispatchMode objects active on this thread, innermost last."""
    # Private names are imported where used: a PyTorch that moves one breaks only this function.
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return list(_get_current_dispatch_mode_stack())


def checkpoint_generator(module: Any, recompute_context: Callable[[], Any], args: Tuple[Any, ...],
                         kwargs: Dict[str, Any]):
    """Non-reentrant activation checkpointing of one module call, RNG state preserved.

    The generator behind ``torch.distributed._composable.checkpoint``: entered before the module's
    forward, finished after it. ``recompute_context()`` is entered while the block is recomputed.
    """
    # Private names are imported where used: a PyTorch that moves one breaks only this function.
    from torch.utils.checkpoint import _checkpoint_without_reentrant_generator

    return _checkpoint_without_reentrant_generator(
        module, True, lambda: (nullcontext(), recompute_context()), "default", False, True, *args, **kwargs)


def fsdp2_gathered_tensors(model: torch.nn.Module) -> List[torch.Tensor]:
    """The tensors each FSDP2 unit of ``model`` gathers its parameters into (empty for a model
    without ``fully_shard``). FSDP2 keeps them between gathers, their storages shrunk to nothing."""
    out: List[torch.Tensor] = []
    for module in model.modules():
        state_of = getattr(module, "_get_fsdp_state", None)
        group = getattr(state_of(), "_fsdp_param_group", None) if state_of is not None else None
        for param in getattr(group, "fsdp_params", ()):
            out.extend(getattr(param, "all_gather_outputs", ()))
            out.extend(getattr(param, "_unsharded_inner_tensors", ()))
    return out
