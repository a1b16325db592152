"""The training loop.

Reads top to bottom, like nanoGPT's: check everything that can be checked before any work, join
the process group, build the run, then loop: step, snapshot, log, evaluate. Building
(:mod:`~tierflow.trainer.build`), the step (:mod:`~tierflow.trainer.step`), offloading
(:mod:`~tierflow.trainer.offloading`) and the summary (:mod:`~tierflow.trainer.summary`) live in
their own modules; a component that is switched off is a null object, not an ``if`` at every use.
``python -m tierflow.trainer.train [overrides]`` runs it, also under torchrun; ``tierflow train``
is the same entry point.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from tierflow.trainer._scratch import remove_stale_scratch
from tierflow.trainer.build import build_run, model_name, prepare_run_dir
from tierflow.trainer.checkpoint import default_persist_dir, run_config_hash, run_identity, start_checkpointing
from tierflow.trainer.cli import main as cli_main
from tierflow.trainer.config import TrainConfig
from tierflow.trainer.data import TokenSource
from tierflow.trainer.distributed import Runtime, end_process, init_runtime, shutdown_runtime
from tierflow.trainer.metrics import open_sink, peak_memory_bytes, plot_losses, progress_bar, reset_peak_memory
from tierflow.trainer.offloading import start_offload
from tierflow.trainer.optim import tiered_summary
from tierflow.trainer.preflight import check_before_work, dry_run
from tierflow.trainer.profile import step_window, write_profile
from tierflow.trainer.step import evaluate, parameter_digest, train_step
from tierflow.trainer.summary import format_summary, make_summary

__all__ = ["TrainResult", "dry_run", "main", "train"]


@dataclass
class TrainResult:
    losses: List[float]
    val_losses: List[Tuple[int, float]]
    summary: Dict[str, Any]
    model: nn.Module
    run_dir: Optional[Path] = None
    records: List[Dict[str, Any]] = field(default_factory=list)


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.trainer.steps`` optimizer steps.

    Raises:
        ConfigError: a setting is wrong (raised before any device, process-group or disk work).
    """
    source = check_before_work(cfg)  # batch split, token file, model target, checkpoints, host RAM
    remove_stale_scratch()  # temp dirs of tierflow processes killed with SIGKILL (Note [whose scratch directory])
    rt = init_runtime(cfg.trainer.device, group=cfg.trainer.parallel == "fsdp2")
    try:  # leave the process group even when the run fails
        result = _run(cfg, rt, source)
    except BaseException:
        shutdown_runtime(rt, failed=True)
        raise
    shutdown_runtime(rt)
    return result


def _run(cfg: TrainConfig, rt: Runtime, source: TokenSource) -> TrainResult:
    tc = cfg.trainer
    # 1. Build: model, tiers, optimizer, schedule, data; then the run directory.
    parts = build_run(cfg, rt, source)
    run_dir = prepare_run_dir(cfg, rt)
    # 2. In-memory snapshots: restore the newest complete one (memory, peers, disk) before training.
    run_id = run_identity(cfg, rt.world_size)  # Note [run identity]: whose snapshots and copies are whose
    ckpt = start_checkpointing(cfg.checkpoint, parts, rt, default_persist_dir(cfg, run_id),
                               config_hash=run_config_hash(cfg), run_id=run_id)
    streamed = getattr(ckpt, "streamed", False)  # a state in the tiers is restored through the runtime, below
    start_step = 0 if streamed else ckpt.restore()
    # 3. Offloading profiles its first steps, plans, then runs every later step under the plan;
    #    without it, trainer.profile_iterations traces a window of steps.
    offload = start_offload(cfg, parts, checkpointing=cfg.checkpoint.enabled and not streamed)
    if streamed:
        start_step = ckpt.restore(offload)
    window = step_window(cfg, parts, record=rt.is_main, offloading=cfg.offload.policy != "none")
    sink = open_sink(cfg.logging, run_dir, asdict(cfg), is_main=rt.is_main)
    bar = progress_bar(tc.steps, "train", enabled=rt.is_main and cfg.logging.progress)
    bar.update(start_step)
    losses: List[float] = []
    val_losses: List[Tuple[int, float]] = []
    records: List[Dict[str, Any]] = []
    step_times: List[float] = []
    tokens_per_step = tc.global_batch * cfg.data.seq_len
    _log_resumed_step(ckpt, sink, records)
    reset_peak_memory(rt.device)
    start = time.perf_counter()
    try:
        for step in range(start_step, tc.steps):
            # 4. One optimizer step (micro-batches, clipping, update) under the window and the plan.
            t0 = time.perf_counter()
            lr = parts.optimizer.param_groups[0]["lr"]
            batches = parts.loader.micro_batches(step)
            with window.step(step, batches), offload.step(batches):
                loss = train_step(parts.wrapped, parts.optimizer, batches, parts.amp_dtype, tc.grad_clip, parts.step)
            parts.scheduler.step()
            loss_value = rt.mean(loss).item()  # also the step's device sync
            if not math.isfinite(loss_value):  # before the snapshot: a restart must not resume into it
                raise FloatingPointError(f"loss became {loss_value} at step {step + 1}; "
                                         "lower optimizer.lr or set trainer.grad_clip")
            ckpt.after_step(step + 1, note={"loss": loss_value})  # snapshot: copied during the next step
            dt = time.perf_counter() - t0
            step_times.append(dt)
            losses.append(loss_value)
            # 5. Log, and evaluate every eval_every steps and at the end.
            record: Dict[str, Any] = {"loss": loss_value, "lr": lr, "step_time_s": dt,
                                      "tokens_per_s": tokens_per_step / dt,
                                      "peak_memory_bytes": peak_memory_bytes(rt.device),
                                      **offload.last_report.metrics()}
            if (tc.eval_every and (step + 1) % tc.eval_every == 0) or step + 1 == tc.steps:
                with offload.resident():  # what waits in a tier between steps comes back for evaluation
                    record["val_loss"] = evaluate(parts.wrapped, parts.loader, tc.eval_batches, parts.amp_dtype, rt)
                val_losses.append((step + 1, record["val_loss"]))
            records.append({"step": step + 1, **record})
            sink.log(step + 1, record)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                            refresh=False)
            bar.update(1)
        ckpt.finish(tc.steps)  # last snapshot, persisted if configured
        with offload.resident():  # within the budget: a state that does not fit comes back tensor by tensor
            if not val_losses:  # resumed after the last step: nothing was left to train, report where it stands
                val_losses.append((tc.steps, evaluate(parts.wrapped, parts.loader, tc.eval_batches, parts.amp_dtype,
                                                      rt)))
            digest = parameter_digest(parts.model)
    except BaseException:
        ckpt.abort()
        sink.close_on_error()
        raise
    finally:
        bar.close()
        # Every tensor back on the device and hooks removed; a state built into a tier stays there.
        offload.close(restore=parts.placement is None)
        tiered = tiered_summary(parts.optimizer)
        parts.close()  # the tiered optimizer's slots and swap files, then the tiers
    # 6. Summary: figures, the profile and the plan files, the loss plot.
    summary = make_summary(cfg, model=parts.model, model_name=model_name(cfg), source=source, device=rt.device,
                           world_size=rt.world_size, amp_dtype=parts.amp_dtype, losses=losses, val_losses=val_losses,
                           step_times=step_times, wall_s=time.perf_counter() - start,
                           digests=rt.gather(digest), run_dir=str(run_dir))
    summary.update(ckpt.summary())
    if tiered is not None:
        summary["tiered_optimizer"] = tiered
    _add_offload_and_profile(cfg, rt, summary, offload, window, run_dir)
    sink.finish(summary)
    if rt.is_main:
        if cfg.logging.plot:
            plot_losses(records, run_dir / "loss.png", f"{summary['model']} on {source.describe()}",
                        summary["data_loss_floor"])
        print(format_summary(summary), flush=True)
    return TrainResult(losses, val_losses, summary, parts.model, run_dir, records)


def _log_resumed_step(ckpt, sink, records: List[Dict[str, Any]]) -> None:
    """A resumed run's metrics.jsonl starts with the step it resumed from and that step's loss, so
    the curve continues where the run left off (the loss is kept with every snapshot)."""
    res = ckpt.restored
    if res is None or "loss" not in res.note:
        return
    record = {"loss": float(res.note["loss"]), "resumed_from": res.source}
    records.append({"step": res.step, **record})
    sink.log(res.step, record)


def _add_offload_and_profile(cfg: TrainConfig, rt: Runtime, summary: Dict[str, Any], offload, window,
                             run_dir: Path) -> None:
    """Offloading totals, and on rank 0 the plan files and the profile, into ``summary``."""
    offload_summary = offload.summary()
    if offload_summary is not None:
        summary["offload"] = offload_summary
        if rt.device.type == "cuda":
            # The runtime resets the allocator's peak at every step to report each one: the run's
            # peak is the larger of every step's and the allocator's since the last reset.
            summary["peak_memory_bytes"] = max(summary["peak_memory_bytes"], offload_summary["device_peak_bytes"])
        if rt.is_main:  # plan.json, plan.txt (its explanation), plan.png, trace.tftrace
            offload_summary["files"] = {k: str(v) for k, v in offload.save_plan(run_dir, plot=cfg.logging.plot).items()}
    trace = window.trace if window.trace is not None else (offload.trace if cfg.trainer.profile_iterations else None)
    if trace is not None and rt.is_main:
        summary["profile"] = str(write_profile(trace, run_dir, plot=cfg.logging.plot)[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m tierflow.trainer.train [--dry-run] [overrides...]``."""
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    end_process(main())  # Note [a finished rank exits without destructors]
