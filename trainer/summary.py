"""The end-of-run summary: the numbers (``summary.json``) and the text printed on rank 0."""

from __future__ import annotations

import math
from statistics import median
from typing import Any, Dict, List, Optional, Sequence

import torch

from tierflow.trainer.config import TrainConfig
from tierflow.trainer.data import SyntheticMarkov, TokenSource
from tierflow.trainer.metrics import peak_memory_bytes
from tierflow.trainer.model import count_parameters

__all__ = ["format_summary", "make_summary"]


def make_summary(cfg: TrainConfig, *, model: torch.nn.Module, model_name: str, source: TokenSource,
                 device: torch.device, world_size: int, amp_dtype: Optional[torch.dtype], losses: Sequence[float],
                 val_losses: Sequence[tuple], step_times: Sequence[float], wall_s: float,
                 digests: List[str], run_dir: str) -> Dict[str, Any]:
    """The figures of a finished run (offloading, snapshots and profile are added by the caller)."""
    tokens_per_step = cfg.trainer.global_batch * cfg.data.seq_len
    steady = list(step_times[1:]) or list(step_times)  # the first step pays for warm-up
    # A run resumed after its last step trains nothing: no loss, no throughput, the state kept.
    return {
        "model": model_name, "parameters": count_parameters(model), "steps": cfg.trainer.steps,
        "world_size": world_size, "device": str(device),
        "precision": _precision(cfg, amp_dtype),
        "final_loss": losses[-1] if losses else None, "final_val_loss": val_losses[-1][1],
        "tokens_per_s": tokens_per_step * len(steady) / sum(steady) if steady else 0.0,
        "median_step_time_s": median(step_times) if step_times else 0.0, "wall_s": wall_s,
        "steps_run": len(losses),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "CUDA allocator" if device.type == "cuda" else "process RSS",
        "uniform_loss": math.log(cfg.data.vocab_size),
        "data_loss_floor": source.entropy_floor if isinstance(source, SyntheticMarkov) else None,
        "param_digests": digests, "run_dir": run_dir,
    }


def _precision(cfg: TrainConfig, amp_dtype: Optional[torch.dtype]) -> str:
    """``bf16_master`` (bf16 compute over fp32 masters), else the autocast dtype or fp32."""
    if cfg.trainer.precision == "bf16_master":
        return "bf16_master"
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"


def format_summary(s: Dict[str, Any]) -> str:
    """The summary as the lines rank 0 prints at the end of ``tierflow train``."""
    floor = f"; data floor {s['data_loss_floor']:.3f}" if s.get("data_loss_floor") is not None else ""
    return "\n".join([
        f"tierflow: trained {s['model']} ({s['parameters'] / 1e6:.2f}M params) for {s['steps']} steps "
        f"on {s['device']} x{s['world_size']} ({s['precision']})",
        (f"  loss        {s['final_loss']:.4f} (val {s['final_val_loss']:.4f}{floor}; uniform {s['uniform_loss']:.3f})"
         if s["final_loss"] is not None else
         f"  loss        no step left to run (val {s['final_val_loss']:.4f}{floor}; uniform {s['uniform_loss']:.3f})"),
        f"  throughput  {s['tokens_per_s']:,.0f} tokens/s (median step {s['median_step_time_s'] * 1e3:.1f} ms)",
        f"  peak memory {s['peak_memory_bytes'] / 2**20:,.1f} MiB (measured: {s['peak_memory_kind']})",
        f"  run dir     {s['run_dir']}",
        *([f"  profile     {s['profile']}"] if s.get("profile") else []),
        *_offload_lines(s.get("offload"), cuda=str(s["device"]).startswith("cuda")),
        *_tiered_lines(s.get("tiered_optimizer")),
        *([f"  snapshots   {s['snapshots']} ({s['snapshot_stall_s'] * 1e3:.1f} ms training stall in all), "
           f"{s['checkpoints_persisted']} persisted"
           + (f"; resumed from step {s['resumed_from_step']} ({s['resumed_from']})" if 'resumed_from' in s else "")]
          if "snapshot_stall_s" in s else []),
        *([f"  checkpoints {s['checkpoints_persisted']} streamed to disk ({s['checkpoint_persist_s']:.1f} s in all; "
           "the state lives in the tiers, no in-memory snapshots)"
           + (f"; resumed from step {s['resumed_from_step']}" if 'resumed_from_step' in s else "")]
          if s.get("checkpoint_streamed") else []),
    ])


def _tiered_lines(t: Optional[Dict[str, Any]]) -> List[str]:
    if not t:
        return []
    where = ", ".join(f"{k} {n}" for k, n in sorted(t["placement"].items()))
    early = f"; {t['early_updates']} updates during backward" if t["early_updates"] else ""
    redone = f", {t['redone_steps']} step(s) redone (gradients changed after backward)" if t["redone_steps"] else ""
    return [f"  optimizer   tiered: {t['subgroups']} sub-groups ({where}); {t['bytes_read'] / 2**20:,.1f} MiB read, "
            f"{t['bytes_written'] / 2**20:,.1f} MiB written{early}{redone}"]


def _peaks_by_mode(peaks: Dict[str, int]) -> str:
    order = ("warmup", "profile", "planned", "fallback")
    return ", ".join(f"{mode} {peaks[mode] / 2 ** 20:,.1f} MiB" for mode in order if mode in peaks) or "no step"


def _offload_lines(o: Optional[Dict[str, Any]], *, cuda: bool) -> List[str]:
    if not o or "device_budget_bytes" not in o:
        return [f"  offloading {o['policy']}: no plan was made"] if o else []
    mib = 2 ** 20
    moved = sum(o["bytes_out"].values()) + sum(o["bytes_in"].values())
    steps = o["steps"]
    return [
        f"  offloading  {o['policy']} on {o['hardware']}: budget {o['device_budget_bytes'] / mib:,.1f} MiB = "
        f"{o['device_budget_bytes'] / max(o['unconstrained_peak_bytes'], 1):.0%} of the unconstrained peak "
        f"{o['unconstrained_peak_bytes'] / mib:,.1f} MiB",
        # On CUDA the allocator measures the device peak; on a CPU it is computed (Note [every step
        # is measured]): live storages counted after every operation, the trace replayed on planned
        # steps. The process's measured figure is the peak RSS line above.
        f"              {'measured' if cuda else 'computed'} peak {o['device_peak_bytes'] / mib:,.1f} MiB over every "
        f"step ({_peaks_by_mode(o.get('peak_by_mode', {}))}"
        + (f"; {o.get('device_reserved_peak_bytes', 0) / mib:,.1f} MiB reserved" if cuda else "") + "; "
        + ("CUDA allocator" if cuda else "live storages per operation, the plan's trace on planned steps") + ")",
        f"              moved {moved / mib:,.1f} MiB ({', '.join(sorted(o['bytes_out'])) or 'nothing'}); "
        f"stall {o['stall_s'] * 1e3:,.1f} ms",
        f"              steps: {steps.get('warmup', 0)} warm-up and {steps.get('profile', 0)} profiled (no plan yet: "
        f"{'online policy under the budget' if o.get('online_budget_bytes') else 'no budget'}), "
        f"{steps.get('planned', 0)} planned, {steps.get('fallback', 0)} fallback; {o['plan_hits']} plan hits, "
        f"{o['fallbacks']} fallbacks, {o['divergent_iterations']} divergent, {o['reprofiles']} re-profiles",
    ]
