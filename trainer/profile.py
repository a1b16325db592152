"""Profile real training steps with the lifetime tracer: the first stage of profile -> plan -> run.

:func:`profile_steps` runs steps of an already-built run under a
:class:`~tierflow.profiling.LifetimeTracer` and detaches it before returning, so the loop that called it
trains on at full speed (the trainer, and later the offload runtime, call it in-process for their
warm-up iterations). :func:`profile_training` builds a run from its config, profiles it and writes
``trace.tftrace``, ``profile.txt`` and ``memory.png`` into the run directory: ``tierflow profile``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

from tierflow.profiling import LifetimeTrace, TracerConfig, TraceWindow, save_trace, write_report
from tierflow.trainer.build import RunParts, build_run, prepare_run_dir
from tierflow.trainer.config import TrainConfig, micro_batch_size
from tierflow.trainer.data import build_source
from tierflow.trainer.distributed import env_world_size, init_runtime, shutdown_runtime
from tierflow.trainer.metrics import progress_bar
from tierflow.trainer.step import train_step

__all__ = ["NoTraceWindow", "ProfileResult", "ProfiledSteps", "profile_steps", "profile_training", "step_window",
           "write_profile"]


@dataclass(frozen=True)
class ProfiledSteps:
    """What :func:`profile_steps` returns.

    Attributes:
        trace: The lifetime trace (None where ``record=False``, e.g. ranks other than 0).
        losses: The loss of every step run, in order (this rank's, not averaged over ranks).
    """

    trace: Optional[LifetimeTrace]
    losses: Tuple[float, ...]


@dataclass(frozen=True)
class ProfileResult:
    """What ``tierflow profile`` produced (paths are None on ranks other than 0).

    Attributes:
        trace: The trace of the profiled iterations (None on ranks other than 0).
        losses: Loss of every step run, warm-up steps included.
        run_dir: The run directory.
        trace_path: ``trace.tftrace``.
        summary_path: ``profile.txt``.
        plot_path: ``memory.png`` (None with ``logging.plot=false``).
        summary: The text of ``profile.txt``.
    """

    trace: Optional[LifetimeTrace]
    losses: Tuple[float, ...]
    run_dir: Path
    trace_path: Optional[Path]
    summary_path: Optional[Path]
    plot_path: Optional[Path]
    summary: str


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be a whole number >= {minimum}")
    return value


def profile_steps(parts: RunParts, *, first_step: int, num_iterations: int, grad_clip: float, record: bool = True,
                  config: TracerConfig = TracerConfig(),
                  on_step: Optional[Callable[[int, float], None]] = None) -> ProfiledSteps:
    """Run optimizer steps ``first_step .. first_step + num_iterations - 1`` under the tracer.

    They are real training steps (the model learns; the schedule advances), exactly what the
    loop would have run: the tracer observes and changes no result. It is detached before this
    returns.

    Args:
        parts: The run, from :func:`tierflow.trainer.build.build_run`.
        first_step: Optimizer step number of the first profiled step (selects its data).
        num_iterations: How many steps to trace (>= 1).
        grad_clip: As ``trainer.grad_clip``.
        record: False runs the same steps untraced (ranks other than 0 under torchrun).
        config: Tracer settings.
        on_step: Called as ``on_step(step, loss)`` after every step (progress bars).

    Returns:
        The trace and the losses.

    Raises:
        ValueError: ``num_iterations`` < 1 or ``first_step`` < 0.
    """
    _check_count("num_iterations", num_iterations, 1)
    _check_count("first_step", first_step, 0)
    window = TraceWindow(parts.model, parts.optimizer, num_iterations=num_iterations, first_step=first_step,
                         config=config, record=record)
    losses: List[float] = []
    for step in range(first_step, first_step + num_iterations):
        # Data comes from outside the iteration, as from a loader: it enters as an input.
        batches = parts.loader.micro_batches(step)
        with window.step(step, batches):
            loss = train_step(parts.wrapped, parts.optimizer, batches, parts.amp_dtype, grad_clip, parts.step)
        parts.scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return ProfiledSteps(trace=window.trace, losses=tuple(losses))


class NoTraceWindow:
    """The switched-off :class:`~tierflow.profiling.TraceWindow`: every step runs untraced."""

    trace = None

    def step(self, step: int, inputs: Any = None):
        return nullcontext()


def step_window(cfg: TrainConfig, parts: RunParts, *, record: bool,
                offloading: bool) -> Union[TraceWindow, NoTraceWindow]:
    """The trace window of ``trainer.profile_iterations`` (steps ``profile_warmup ..``) of a run.

    With offloading on, the runtime's own trace is the profile, so no second tracer attaches.
    """
    tc = cfg.trainer
    if not tc.profile_iterations or offloading:
        return NoTraceWindow()
    return TraceWindow(parts.model, parts.optimizer, num_iterations=tc.profile_iterations,
                       first_step=tc.profile_warmup, record=record)


def write_profile(trace: LifetimeTrace, run_dir: Path, *, plot: bool) -> Tuple[Path, Path, Optional[Path]]:
    """Write ``trace.tftrace``, ``profile.txt`` and (with ``plot``) ``memory.png`` into ``run_dir``."""
    trace_path = save_trace(trace, run_dir / "trace.tftrace")
    files = write_report(trace, run_dir, plot=plot)
    return trace_path, files.summary, files.plot


def profile_training(cfg: TrainConfig, *, num_iterations: int = 3, num_warmup: int = 1,
                     tracer_config: TracerConfig = TracerConfig()) -> ProfileResult:
    """Build the run ``cfg`` describes, train ``num_warmup`` steps, then profile ``num_iterations``.

    The warm-up steps run untraced so that lazily created state (optimizer moments, allocator
    pools) exists before tracing, as in every later iteration. Rank 0 traces and writes
    ``trace.tftrace``, ``profile.txt`` and (with ``logging.plot``) ``memory.png`` into a new run
    directory (owner-only); other ranks run the same steps untraced.

    Args:
        cfg: The composed config (``tierflow.trainer.compose.load_config``).
        num_iterations: Iterations to trace (>= 1; 2 or more also checks that they repeat).
        num_warmup: Untraced steps before them (>= 0).
        tracer_config: Tracer settings.

    Returns:
        The trace, the losses and where the files went.

    Raises:
        ValueError: a bad count; ConfigError (a ValueError): a bad setting, before any work.
    """
    _check_count("num_iterations", num_iterations, 1)
    _check_count("num_warmup", num_warmup, 0)
    micro_batch_size(cfg.trainer, env_world_size())
    source = build_source(cfg.data, cfg.trainer.seed)
    rt = init_runtime(cfg.trainer.device, group=cfg.trainer.parallel == "fsdp2")
    try:
        parts = build_run(cfg, rt, source)
        run_dir = prepare_run_dir(cfg, rt, "-profile")
        bar = progress_bar(num_warmup + num_iterations, "profile", enabled=rt.is_main and cfg.logging.progress)
        losses: List[float] = []
        try:
            for step in range(num_warmup):
                loss = train_step(parts.wrapped, parts.optimizer, parts.loader.micro_batches(step), parts.amp_dtype,
                                  cfg.trainer.grad_clip, parts.step)
                parts.scheduler.step()
                losses.append(loss.item())
                bar.update(1)
            profiled = profile_steps(parts, first_step=num_warmup, num_iterations=num_iterations,
                                     grad_clip=cfg.trainer.grad_clip, record=rt.is_main, config=tracer_config,
                                     on_step=lambda *_: bar.update(1))
        finally:
            bar.close()
            parts.close()
        losses.extend(profiled.losses)
        trace = profiled.trace
        if not rt.is_main or trace is None:
            return ProfileResult(None, tuple(losses), run_dir, None, None, None, "")
        trace_path, summary_path, plot_path = write_profile(trace, run_dir, plot=cfg.logging.plot)
        return ProfileResult(trace, tuple(losses), run_dir, trace_path, summary_path, plot_path,
                             summary_path.read_text().rstrip("\n"))
    finally:
        shutdown_runtime(rt)

