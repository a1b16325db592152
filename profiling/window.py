"""A window of traced iterations inside any training loop: the one place that attaches a tracer
for a few steps and detaches it afterwards.

The trainer traces steps ``profile_warmup ..`` of a normal run with it (``trainer.profile_iterations``),
``tierflow profile`` traces a whole run's worth, and the offload runtime traces the iterations it
plans from. Steps outside the window run with no hook at all.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import nn

from tierflow.profiling.trace import LifetimeTrace
from tierflow.profiling.tracer import LifetimeTracer, MovingTensors, TracerConfig

__all__ = ["TraceWindow", "trace_iterations"]


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be a whole number >= {minimum}")
    return value


class TraceWindow:
    """Trace ``num_iterations`` consecutive iterations, then detach.

    Use :meth:`iteration` for "the next traced iteration" (the window counts them), or
    :meth:`step` with the loop's step number, which traces only steps
    ``first_step .. first_step + num_iterations - 1`` and runs the others untouched. The tracer
    attaches when the first traced iteration begins and detaches when the last one ends, or when a
    traced iteration raises (the window is then spent and :attr:`trace` stays None).

    Args:
        model: The module being trained.
        optimizer: Its optimizer (or None).
        num_iterations: How many iterations to trace (>= 1).
        first_step: For :meth:`step`: the step number of the first traced step (>= 0).
        config: Tracer settings.
        record: False runs the same iterations untraced (ranks other than 0, say); :attr:`complete`
            still turns True after them.
        saved_hooks, moving: Passed to the :class:`LifetimeTracer`.

    Example:
        >>> window = TraceWindow(model, opt, num_iterations=2, first_step=1)  # doctest: +SKIP
        >>> for step, batch in enumerate(batches):  # doctest: +SKIP
        ...     with window.step(step, batch):
        ...         loss_fn(model(batch)).backward(); opt.step(); opt.zero_grad()
        >>> window.trace  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], *, num_iterations: int,
                 first_step: int = 0, config: Optional[TracerConfig] = None, record: bool = True,
                 saved_hooks: Optional[Tuple[Callable[..., Any], Callable[..., Any]]] = None,
                 moving: Optional[MovingTensors] = None) -> None:
        self.num_iterations = _count("num_iterations", num_iterations, 1)
        self.first_step = _count("first_step", first_step, 0)
        self._model, self._optimizer, self._config, self._record = model, optimizer, config or TracerConfig(), record
        self._saved_hooks, self._moving = saved_hooks, moving
        self._tracer: Optional[LifetimeTracer] = None
        self.traced = 0
        self.trace: Optional[LifetimeTrace] = None
        self.complete = False

    def covers(self, step: int) -> bool:
        """Whether step ``step`` (as :meth:`step` numbers them) is traced."""
        return self.first_step <= step < self.first_step + self.num_iterations

    @contextmanager
    def step(self, step: int, inputs: Any = None) -> Iterator[None]:
        """Step ``step`` of the loop: traced when :meth:`covers` it, untouched otherwise."""
        if not self.covers(step) or self.complete:
            yield
            return
        with self.iteration(inputs):
            yield

    @contextmanager
    def iteration(self, inputs: Any = None) -> Iterator[None]:
        """The next traced iteration; ``inputs`` (nested tensors) are keyed as inputs, not activations."""
        if self.complete:
            raise RuntimeError("this TraceWindow has traced all its iterations; make a new one")
        if not self._record:
            yield
            self._advance()
            return
        if self._tracer is None:
            self._tracer = LifetimeTracer(self._model, self._optimizer, self._config, saved_hooks=self._saved_hooks,
                                          moving=self._moving)
            self._tracer.attach()
        try:
            with self._tracer.iteration():
                if inputs is not None:
                    self._tracer.mark_inputs(inputs)
                yield
        except BaseException:
            self.close()
            raise
        self._advance()

    def _advance(self) -> None:
        self.traced += 1
        if self.traced >= self.num_iterations:
            self.complete = True
            if self._tracer is not None:
                tracer, self._tracer = self._tracer, None
                tracer.detach()
                self.trace = tracer.trace()

    def close(self) -> None:
        """Detach now (an unfinished window is spent: :attr:`trace` stays None). Idempotent."""
        self.complete = True
        if self._tracer is not None:
            tracer, self._tracer = self._tracer, None
            tracer.detach()


def trace_iterations(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], step: Callable[[int], Any],
                     num_iterations: int = 1, config: TracerConfig = TracerConfig()) -> LifetimeTrace:
    """Trace ``num_iterations`` calls of ``step(i)`` (one full training iteration each).

    Args:
        model: The module being trained.
        optimizer: Its optimizer (or None).
        step: Runs iteration ``i``: forward, backward, optimizer step.
        num_iterations: How many iterations to trace (>= 1).
        config: Measurement settings.

    Returns:
        The trace; the tracer is detached before this returns.

    Raises:
        ValueError: ``num_iterations`` < 1, or a bad model/optimizer.
    """
    if not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"num_iterations={num_iterations!r} must be an integer >= 1")
    tracer = LifetimeTracer(model, optimizer, config)
    with tracer:
        for i in range(num_iterations):
            with tracer.iteration():
                step(i)
    return tracer.trace()
