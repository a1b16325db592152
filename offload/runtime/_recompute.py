"""The blocks a plan re-runs: their forward runs under activation checkpointing, their re-run in
backward is invisible to the plan executor's points.

Kept apart from :mod:`tierflow.offload.runtime._exec` (which finds points and acts on the plan):
this changes with how a block is checkpointed and what its re-run needs back on the device.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Mapping, Sequence, Set, Tuple

from torch import nn

from tierflow.profiling import torch_compat

__all__ = ["Reruns"]


class Reruns:
    """Checkpointed forwards of the plan's recomputed blocks, one iteration at a time.

    Args:
        blocks: ``(module path, call)`` of the blocks to re-run.
        module_params: Module path -> names of its direct parameters.
        bring_back: Brings a tensor key back to the device (waits for it).
    """

    def __init__(self, blocks: Set[Tuple[str, int]], module_params: Mapping[str, Sequence[str]],
                 bring_back: Callable[[str], Any]) -> None:
        self.blocks, self.module_params, self.bring_back = blocks, module_params, bring_back
        self._open: Dict[Tuple[str, int], Any] = {}
        self.running = 0  # > 0 while a block re-runs inside backward: not a traced point
        self.entering = False  # the checkpoint saves the block's inputs itself: not activations

    def enter(self, module: nn.Module, path: str, call: int, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        """At a block's forward pre-hook: start checkpointing it when the plan re-runs it."""
        if (path, call) not in self.blocks:
            return False
        gen = torch_compat.checkpoint_generator(module, lambda: self._rerun(path), args, kwargs)
        self.entering = True
        try:
            next(gen)
        finally:
            self.entering = False
        self._open[(path, call)] = gen
        return True

    def exit(self, path: str, call: int) -> None:
        """At the block's forward post-hook."""
        gen = self._open.pop((path, call), None)
        if gen is not None:
            next(gen, None)

    def clear(self) -> None:
        """The iteration ended."""
        self._open.clear()

    @contextmanager
    def _rerun(self, path: str) -> Iterator[None]:
        # Note [recompute reads parameters early]: the block re-runs at its first unpack in
        # backward, before the points where the trace (made without checkpointing) used its
        # parameters. Plans keep them on the device there (the planner's side of the note is in
        # tierflow.offload.plan._reruns); a plan from elsewhere may not. Bring them back.
        prefix = path + "."
        for module_path, names in self.module_params.items():
            if module_path == path or module_path.startswith(prefix):
                for name in names:
                    self.bring_back(name)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
