"""The training loop.

Reads top to bottom: validate everything that can be checked before any work, join the process
group, seed, build model/optimizer/data, then loop: step, log, evaluate. ``python -m trainer.train
[overrides]`` runs it, also under torchrun; ``tierflow train`` is the same entry point.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.checkpoint import check_checkpoint_config, run_config_hash, start_checkpointing
from trainer.config import TrainConfig, micro_batch_size
from trainer.data import Batch, ShardedLoader, SyntheticMarkov, TokenSource, build_source
from trainer.distributed import Runtime, env_world_size, init_runtime, shutdown_runtime
from trainer.metrics import (MetricsSink, make_run_dir, peak_memory_bytes, plot_losses, progress_bar,
                             reset_peak_memory)
from trainer.model import build_model, count_parameters
from trainer.optim import build_optimizer

__all__ = ["RunParts", "TrainResult", "build_run", "dry_run", "main", "parameter_digest", "prepare_run_dir", "train",
           "train_step"]


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
    # 1. Everything checkable up front: batch split over ranks, the token file, the model target.
    micro_batch_size(cfg.trainer, env_world_size())
    if cfg.offload.policy == "none" and (cfg.tiers.preset not in ("none", "host") or cfg.tiers.hardware_file):
        import warnings

        warnings.warn(f"tiers={cfg.tiers.preset} (hardware_file={cfg.tiers.hardware_file}) is not used: "
                      "offload.policy=none moves nothing; choose a policy, e.g. offload=lifetime", stacklevel=2)
    check_checkpoint_config(cfg.checkpoint, env_world_size())
    source = build_source(cfg.data, cfg.trainer.seed)
    _check_model_builds(cfg)
    _check_host_memory(cfg)  # every rank of this node with its host tiers must fit, before any tier opens
    # 2. Join the process group and run; leave it even when the run fails.
    rt = init_runtime(cfg.trainer.device)
    try:
        return _run(cfg, rt, source)
    finally:
        shutdown_runtime(rt)


@dataclass
class RunParts:
    """What one training run is made of, built from its config (what ``train_step`` needs)."""

    model: nn.Module  # the module itself; parameters, digests and profiling look here
    wrapped: nn.Module  # what the loop calls: DDP(model) when distributed, else model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: ShardedLoader
    source: TokenSource
    amp_dtype: Optional[torch.dtype]


def build_run(cfg: TrainConfig, rt: Runtime, source: Optional[TokenSource] = None) -> RunParts:
    """Seed, then build model, optimizer, schedule and this rank's loader on ``rt.device``."""
    tc = cfg.trainer
    source = source or build_source(cfg.data, tc.seed)
    seed_everything(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len).to(rt.device)
    wrapped: nn.Module = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.distributed else model
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, tc.steps, tiers=cfg.tiers, grad_accum=tc.grad_accum)
    loader = ShardedLoader(source, global_batch=tc.global_batch, grad_accum=tc.grad_accum,
                           rank=rt.rank, world_size=rt.world_size, device=rt.device)
    return RunParts(model, wrapped, optimizer, scheduler, loader, source, autocast_dtype(tc.precision, rt.device))


def _run(cfg: TrainConfig, rt: Runtime, source: TokenSource) -> TrainResult:
    tc = cfg.trainer
    parts = build_run(cfg, rt, source)
    model, wrapped, optimizer, scheduler, loader = (parts.model, parts.wrapped, parts.optimizer,
                                                    parts.scheduler, parts.loader)
    amp_dtype = parts.amp_dtype

    run_dir = prepare_run_dir(cfg, rt)
    # In-memory snapshots: restore the newest complete one (memory, peers, disk) before training.
    ckpt = start_checkpointing(cfg.checkpoint, parts, rt, run_dir, config_hash=run_config_hash(cfg))
    start_step = ckpt.restore() if ckpt is not None else 0
    sink = MetricsSink(cfg.logging, run_dir, asdict(cfg)) if rt.is_main else None
    bar = progress_bar(tc.steps, "train") if rt.is_main and cfg.logging.progress else None
    if bar is not None and start_step:
        bar.update(start_step)
    # Offloading: the runtime profiles its first steps, plans, then runs every later step under the plan.
    offload = _start_offload(cfg, parts, checkpointing=ckpt is not None)
    profiler = None
    if tc.profile_iterations and offload is None:  # with offloading, the runtime's own trace is the profile
        from trainer.profile import StepTracer  # trainer.profile builds on this module

        profiler = StepTracer(parts, first_step=tc.profile_warmup, num_iterations=tc.profile_iterations,
                              record=rt.is_main)

    tokens_per_step = tc.global_batch * cfg.data.seq_len
    losses: List[float] = []
    val_losses: List[Tuple[int, float]] = []
    records: List[Dict[str, Any]] = []
    step_times: List[float] = []
    reset_peak_memory(rt.device)
    start = time.perf_counter()
    try:
        for step in range(start_step, tc.steps):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            batches = loader.micro_batches(step)
            with profiler.step(step, batches) if profiler is not None else nullcontext(), \
                    offload.step(batches) if offload is not None else nullcontext():
                loss = train_step(wrapped, optimizer, batches, amp_dtype, tc.grad_clip)
            scheduler.step()
            if ckpt is not None:
                ckpt.after_step(step + 1)  # snapshot: copied in the background during the next step
            loss_value = rt.mean(loss).item()  # also the step's device sync
            dt = time.perf_counter() - t0
            step_times.append(dt)
            losses.append(loss_value)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step + 1}; "
                                         "lower optimizer.lr or set trainer.grad_clip")
            record: Dict[str, Any] = {"loss": loss_value, "lr": lr, "step_time_s": dt,
                                      "tokens_per_s": tokens_per_step / dt,
                                      "peak_memory_bytes": peak_memory_bytes(rt.device)}
            if offload is not None:
                record.update(offload.last_report.metrics())
            if (tc.eval_every and (step + 1) % tc.eval_every == 0) or step + 1 == tc.steps:
                record["val_loss"] = evaluate(wrapped, loader, tc.eval_batches, amp_dtype, rt)
                val_losses.append((step + 1, record["val_loss"]))
            records.append({"step": step + 1, **record})
            if sink is not None:
                sink.log(step + 1, record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                refresh=False)
                bar.update(1)
        if ckpt is not None:
            ckpt.finish(tc.steps)  # last snapshot, persisted if configured
    except BaseException:
        if ckpt is not None:
            ckpt.abort()
        if sink is not None:
            sink.close_on_error()
        raise
    finally:
        if bar is not None:
            bar.close()
        if offload is not None:
            offload.close()  # every tensor back on the device, hooks removed, tiers closed
        if hasattr(optimizer, "close"):
            optimizer.close()  # a tiered optimizer frees its slots and removes its swap files

    wall_s = time.perf_counter() - start
    digests = rt.gather(parameter_digest(model))
    steady = step_times[1:] or step_times  # the first step pays for warm-up
    summary: Dict[str, Any] = {
        "model": _model_name(cfg), "parameters": count_parameters(model), "steps": tc.steps,
        "world_size": rt.world_size, "device": str(rt.device),
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "final_loss": losses[-1], "final_val_loss": val_losses[-1][1],
        "tokens_per_s": tokens_per_step * len(steady) / sum(steady),
        "median_step_time_s": median(step_times), "wall_s": wall_s,
        "peak_memory_bytes": peak_memory_bytes(rt.device),
        "peak_memory_kind": "CUDA allocator" if rt.device.type == "cuda" else "process RSS",
        "uniform_loss": math.log(cfg.data.vocab_size),
        "data_loss_floor": source.entropy_floor if isinstance(source, SyntheticMarkov) else None,
        "param_digests": digests, "run_dir": str(run_dir),
        **(ckpt.summary() if ckpt is not None else {}),
    }
    if profiler is not None and profiler.trace is not None:
        from trainer.profile import write_profile

        summary["profile"] = str(write_profile(profiler.trace, run_dir, plot=cfg.logging.plot)[1])
    if offload is not None:
        summary["offload"] = offload.summary()
        if rt.is_main:  # plan.json, plan.txt (its explanation), plan.png, trace.tftrace
            summary["offload"]["files"] = {k: str(v) for k, v in offload.save_plan(run_dir, plot=cfg.logging.plot).items()}
        if tc.profile_iterations and offload.trace is not None and rt.is_main:
            from trainer.profile import write_profile

            summary["profile"] = str(write_profile(offload.trace, run_dir, plot=cfg.logging.plot)[1])
    if sink is not None:
        sink.finish(summary)
        if cfg.logging.plot:
            plot_losses(records, run_dir / "loss.png", f"{summary['model']} on {source.describe()}",
                        summary["data_loss_floor"])
        print(format_summary(summary), flush=True)
    return TrainResult(losses, val_losses, summary, model, run_dir, records)


def _start_offload(cfg: TrainConfig, parts: "RunParts", *, checkpointing: bool):
    """The plan runtime for ``cfg.offload`` (None with ``offload.policy=none``).

    Every rank profiles, plans and runs its own plan; the budget is per rank. With in-memory
    snapshots on, parameters and optimizer states stay resident between steps (the snapshot copies
    them then). Under DistributedDataParallel, DDP owns parameter storage (broadcasts, bucket
    views) and gradients (its reducer's hooks copy them into buckets as they become ready), so
    only activations and optimizer states move (docs/runtime.md, "Data parallelism").
    """
    if cfg.offload.policy == "none":
        return None
    from offload.runtime import OffloadRuntime

    movable = {"param", "grad", "optimizer_state", "activation"}
    if checkpointing:
        movable -= {"param", "optimizer_state"}
    if parts.wrapped is not parts.model:  # DDP
        movable -= {"param", "grad"}
    shared = getattr(parts.optimizer, "engine", None)
    if cfg.optimizer.tiered.enabled:
        # The tiered optimizer keeps its states in the tiers already; the runtime uses the same open
        # tiers (one host budget, one set of swap directories) rather than a second engine.
        movable -= {"optimizer_state"}
    if shared is not None:
        return OffloadRuntime(parts.model, parts.optimizer, cfg.offload, tiers=shared,
                              hardware=cfg.tiers.hardware_model(), movable=frozenset(movable))
    return OffloadRuntime(parts.model, parts.optimizer, cfg.offload, tiers=cfg.tiers, movable=frozenset(movable))


def _check_host_memory(cfg: TrainConfig) -> None:
    """Refuse (TierConfigError, with the numbers) a node whose ranks and host tiers cannot fit in RAM.

    A rank's process memory is estimated as its RSS now plus, when it trains on the CPU, the
    model's training state (weights, gradients, optimizer moments), which lives in host RAM too.
    """
    uses_tiers = cfg.offload.policy != "none" or cfg.optimizer.tiered.enabled
    if not uses_tiers or not (cfg.tiers.host.enabled or cfg.tiers.numa.enabled):
        return
    import psutil

    from offload.capacity import check_host_memory, host_demand, ranks_on_this_node

    process = psutil.Process().memory_info().rss
    on_cpu = cfg.trainer.device == "cpu" or (cfg.trainer.device == "auto" and not torch.cuda.is_available())
    if on_cpu:
        process += dry_run(cfg)["training_state_bytes"]
    check_host_memory(host_demand(cfg.tiers, ranks_on_node=ranks_on_this_node(), process_bytes_per_rank=process))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
               amp_dtype: Optional[torch.dtype], grad_clip: float) -> torch.Tensor:
    """One optimizer step over ``micro_batches``; returns the mean loss (a detached 0-d tensor)."""
    accum = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (inputs, targets) in enumerate(micro_batches):
        # DDP all-reduces gradients only on the last micro-batch of the step.
        sync = nullcontext() if i == accum - 1 or not isinstance(model, DDP) else model.no_sync()
        with sync:
            loss = _loss(model, inputs, targets, amp_dtype)
            (loss / accum).backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accum


@torch.no_grad()
def evaluate(model: nn.Module, loader: ShardedLoader, num_batches: int, amp_dtype: Optional[torch.dtype],
             rt: Runtime) -> float:
    """Mean loss over the first ``num_batches`` global batches of the ``val`` split (the same every time)."""
    model.eval()
    total = torch.zeros((), device=rt.device)
    count = 0
    for i in range(num_batches):
        for inputs, targets in loader.micro_batches(i, split="val"):
            total += _loss(model, inputs, targets, amp_dtype)
            count += 1
    model.train()
    return rt.mean(total / count).item()


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    with torch.autocast(device_type=inputs.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 for ``precision=bf16``, and for ``auto`` on a GPU that supports it; None means fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes in name order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dry_run(cfg: TrainConfig) -> Dict[str, Any]:
    """Check config, data and model construction (on the meta device: no memory) without training."""
    world = env_world_size()
    micro = micro_batch_size(cfg.trainer, world)
    source = build_source(cfg.data, cfg.trainer.seed)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
    n = count_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": _model_name(cfg), "parameters": n, "param_bytes": param_bytes,
            # fp32 weights + grads + AdamW's two moments: the training state offloading will move.
            "training_state_bytes": param_bytes * 4 if cfg.optimizer.name == "adamw" else param_bytes * 3,
            "world_size": world, "micro_batch": micro, "grad_accum": cfg.trainer.grad_accum,
            "tokens_per_step": cfg.trainer.global_batch * cfg.data.seq_len, "data": source.describe()}


def format_summary(s: Dict[str, Any]) -> str:
    floor = f"; data floor {s['data_loss_floor']:.3f}" if s.get("data_loss_floor") is not None else ""
    return "\n".join([
        f"tierflow: trained {s['model']} ({s['parameters'] / 1e6:.2f}M params) for {s['steps']} steps "
        f"on {s['device']} x{s['world_size']} ({s['precision']})",
        f"  loss        {s['final_loss']:.4f} (val {s['final_val_loss']:.4f}{floor}; uniform {s['uniform_loss']:.3f})",
        f"  throughput  {s['tokens_per_s']:,.0f} tokens/s (median step {s['median_step_time_s'] * 1e3:.1f} ms)",
        f"  peak memory {s['peak_memory_bytes'] / 2**20:,.1f} MiB ({s['peak_memory_kind']})",
        f"  run dir     {s['run_dir']}",
        *([f"  profile     {s['profile']}"] if s.get("profile") else []),
        *_offload_lines(s.get("offload")),
        *([f"  snapshots   {s['snapshots']} ({s['snapshot_stall_s'] * 1e3:.1f} ms training stall in all), "
           f"{s['checkpoints_persisted']} persisted"
           + (f"; resumed from step {s['resumed_from_step']} ({s['resumed_from']})" if 'resumed_from' in s else "")]
          if "snapshots" in s else []),
    ])


def _offload_lines(o: Optional[Dict[str, Any]]) -> List[str]:
    if not o or "device_budget_bytes" not in o:
        return [f"  offloading {o['policy']}: no plan was made"] if o else []
    mib = 2 ** 20
    moved = sum(o["bytes_out"].values()) + sum(o["bytes_in"].values())
    steps = o["steps"]
    return [
        f"  offloading  {o['policy']} on {o['hardware']}: budget {o['device_budget_bytes'] / mib:,.1f} MiB = "
        f"{o['device_budget_bytes'] / max(o['unconstrained_peak_bytes'], 1):.0%} of the unconstrained peak "
        f"{o['unconstrained_peak_bytes'] / mib:,.1f} MiB",
        f"              measured peak {o['device_peak_bytes'] / mib:,.1f} MiB (device, as the runtime accounts it); "
        f"moved {moved / mib:,.1f} MiB ({', '.join(sorted(o['bytes_out'])) or 'nothing'}); "
        f"stall {o['stall_s'] * 1e3:,.1f} ms",
        f"              steps: {steps.get('planned', 0)} planned, {steps.get('fallback', 0)} fallback, "
        f"{steps.get('profile', 0)} profiled; {o['plan_hits']} plan hits, {o['fallbacks']} fallbacks, "
        f"{o['divergent_iterations']} divergent, {o['reprofiles']} re-profiles",
    ]


def _check_model_builds(cfg: TrainConfig) -> None:
    """Build the model on the meta device so a bad ``model._target_`` fails before any work."""
    try:
        with torch.device("meta"):
            build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
    except (NotImplementedError, RuntimeError):
        pass  # a module that cannot be built on meta is checked by the real build instead


def _model_name(cfg: TrainConfig) -> str:
    return cfg.model._target_.rsplit(".", 1)[-1]


def prepare_run_dir(cfg: TrainConfig, rt: Runtime, suffix: str = "") -> Path:
    """Rank 0 creates the run directory and saves ``config.yaml`` in it; every rank gets its path."""
    if not rt.is_main:
        return Path(rt.broadcast(None))
    run_dir = make_run_dir(cfg.logging, _model_name(cfg) + suffix)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (run_dir / "config.yaml").chmod(0o600)
    return Path(rt.broadcast(str(run_dir)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m trainer.train [--dry-run] [overrides...]``."""
    from trainer.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
