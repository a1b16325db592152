"""Gradient readiness during backward, so the tiered optimizer can update sub-groups before it ends.

With ``overlap_backward`` every trainable parameter gets a post-accumulate-grad hook. A parameter's
gradient is *final* when its hook has fired ``backward_passes_per_step`` times since the last
``step()`` (the last micro-batch of a gradient-accumulation step); a sub-group is *ready* when every
trainable parameter in it is final. The first final gradient of a step starts the copy phase on a
worker thread, which prefetches state in the predicted order (the order sub-groups became ready
in the previous step; backward order, last layers first, before that) and updates each sub-group as
soon as it is ready. ``step()`` then only releases the rest and finishes.

Note [overlap is checked, never trusted]: an early update reads gradients that might still
change: clipping or unscaling between backward and ``step()``, more backward passes than
configured, reentrant checkpointing. Early updates only ever write proxies and fresh slots
(Note [parameters set aside]), and record each gradient tensor with its version counter (for a
DTensor gradient of FSDP2, a digest of its shard's bytes: ``grad_mark``). At ``step()`` every
recorded gradient is compared with the one the parameter has now; if any was replaced or modified in place, the early work is dropped, the step is redone synchronously from the
final gradients (exact), and overlap is switched off with a warning.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from tierflow.offload.optim._pipeline import StepPipeline, StepRun
from tierflow.offload.optim._update import grad_mark
from tierflow.offload.optim.placement import SubGroup
from tierflow.profiling import remove_hooks

__all__ = ["EarlyStep", "GradReadiness", "changed_grads"]


class GradReadiness:
    """Counts gradient accumulations per parameter and tells which sub-groups are ready.

    Args:
        params: every parameter in flat order.
        subgroups: the partition of ``params``.
        passes_per_step: backward passes per optimizer step (gradient accumulation).
        on_first_ready: called (on the autograd thread, once per step) when the first sub-group
            becomes ready; it starts the early copy phase.
    """

    def __init__(self, params: Sequence[torch.Tensor], subgroups: Sequence[SubGroup], passes_per_step: int,
                 on_first_ready: Callable[[], None]) -> None:
        self.passes_per_step = passes_per_step
        self._on_first_ready = on_first_ready
        self._cond = threading.Condition()
        self._sub_of: Dict[int, int] = {pid: sg.index for sg in subgroups for pid in sg.param_ids}
        self._need = [sum(1 for pid in sg.param_ids if params[pid].requires_grad) for sg in subgroups]
        self._counts = [0] * len(params)
        self._left: List[int] = []
        self._ready: List[bool] = []
        self.ready_order: List[int] = []
        self.previous_order: Tuple[int, ...] = tuple(sg.index for sg in reversed(subgroups))
        self.overrun = False  # a gradient accumulated more often than passes_per_step
        self._released = False
        self._started = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(pid))
                         for pid, p in enumerate(params) if p.requires_grad]
        self.reset()

    def predicted_order(self) -> Tuple[int, ...]:
        """The order to prefetch and update in: last step's readiness order, then the rest."""
        seen = set(self.previous_order)
        return self.previous_order + tuple(i for i in range(len(self._need)) if i not in seen)

    @property
    def released(self) -> bool:
        """True once ``step()`` declared every gradient final."""
        return self._released

    def wait(self, i: int) -> None:
        """Block until sub-group ``i`` is ready or :meth:`release` was called."""
        with self._cond:
            while not self._ready[i] and not self._released:
                self._cond.wait()

    def release(self) -> None:
        """Every gradient is final now (``step()`` was called): unblock every wait."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def reset(self) -> None:
        """Start counting for the next step (after ``step()``)."""
        with self._cond:
            if self.ready_order:
                self.previous_order = tuple(self.ready_order)
            self._counts = [0] * len(self._counts)
            self._left = list(self._need)
            self._ready = [n == 0 for n in self._need]
            self.ready_order = []
            self.overrun = False
            self._released = False
            self._started = False

    def remove(self) -> None:
        """Remove the hooks (the optimizer is closed)."""
        remove_hooks(self._handles)

    def _hook(self, pid: int) -> Callable[[torch.Tensor], None]:
        def on_grad(_: torch.Tensor) -> None:
            start = False
            with self._cond:
                self._counts[pid] += 1
                if self._counts[pid] > self.passes_per_step:
                    self.overrun = True
                    return
                if self._counts[pid] < self.passes_per_step:
                    return
                i = self._sub_of[pid]
                self._left[i] -= 1
                if self._left[i] == 0:
                    self._ready[i] = True
                    self.ready_order.append(i)
                    self._cond.notify_all()
                    start, self._started = not self._started, True
            if start:
                self._on_first_ready()

        return on_grad


def changed_grads(recorded: Dict[int, List[Tuple[Optional[torch.Tensor], Hashable]]],
                    sub_params: Callable[[int], List[torch.Tensor]]) -> List[int]:
    """Sub-groups whose gradients were replaced or modified since their early update read them."""
    changed = []
    for i, grads in recorded.items():
        for p, (g, mark) in zip(sub_params(i), grads):
            if p.grad is not g or (g is not None and grad_mark(g) != mark):
                changed.append(i)
                break
    return changed


class EarlyStep:
    """The copy phase of one step, run on a worker thread from the first final gradient on.

    Each sub-group's update waits (``GradReadiness.wait``) until its gradients are final; the
    gradients it read are recorded for the check in ``step()`` (Note [overlap is checked, never trusted]).
    Errors are kept for ``step()`` to report; the thread never raises.
    """

    def __init__(self, pipe: StepPipeline, ready: GradReadiness, order: Sequence[int],
                 where: Optional[Sequence[str]], depth: int) -> None:
        self.run, self.errors = StepRun(), []  # type: StepRun, List[BaseException]
        self._ready = ready

        def gate(i: int) -> None:
            ready.wait(i)
            if not ready.released:
                pipe.counters["early_updates"] += 1  # began before step() was called

        def work() -> None:
            with torch.no_grad():  # grad mode is per thread
                try:
                    pipe.stream(self.run, order, where, aside=True, depth=depth, gate=gate)
                except BaseException as exc:  # noqa: BLE001 - reported by step()
                    self.errors.append(exc)

        self.thread = threading.Thread(target=work, name="tierflow-optimizer-step", daemon=True)
        self.thread.start()

    def join(self) -> Tuple[StepRun, List[BaseException]]:
        """Declare every gradient final, wait for the thread, and return what it did and its errors."""
        self._ready.release()
        self.thread.join()
        return self.run, self.errors
