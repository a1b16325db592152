"""DeepSpeed ZeRO stage 3 as the benchmarks drive it: one config for its CPU and NVMe offload.

Shared by ``train_out_of_core.py`` (one process, NVMe) and ``fsdp2_offload.py`` (``torchrun``
ranks, CPU or NVMe). Both run DeepSpeed's CPU accelerator over gloo, so the environment is set
before ``import deepspeed`` (its accelerator is chosen once, at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict, Optional

#: Buffer and bucket settings, sized for a small-RAM machine (DeepSpeed's own NVMe defaults were
#: OOM-killed). ``buffer_size`` and ``buffer_count`` are elements and buffers of page-locked memory
#: for swapping parameters in; the others are DeepSpeed's ZeRO-3 keys of the same meaning.
ZERO3_DEFAULTS = {"sub_group_size": 100_000_000, "max_live": 100_000_000, "prefetch": 50_000_000, "pin": False,
                  "buffer_count": 5, "buffer_size": 100_000_000, "max_in_cpu": 0, "opt_buffer_count": 4}


def use_cpu_accelerator() -> None:
    """Select DeepSpeed's CPU accelerator (the benchmarks train on the host); call before ``import deepspeed``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_import_error() -> Optional[str]:
    """Why ``import deepspeed`` fails in a fresh interpreter with the CPU accelerator, or None if it works.

    A subprocess, so the caller's memory and imports stay as they were.
    """
    done = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {done.returncode}"


def zero3_config(batch: int, offload: str, swap_dir: Optional[str], *, lr: float, weight_decay: float,
                 clip: float = 0.0, settings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A DeepSpeed config: ZeRO-3, AdamW, parameters and optimizer states offloaded to ``offload``.

    Args:
        batch: sequences per rank per step (``train_micro_batch_size_per_gpu``; no accumulation).
        offload: ``"cpu"`` (host memory; DeepSpeedCPUAdam steps there) or ``"nvme"`` (swap files in
            ``swap_dir`` through DeepSpeed's async I/O, which needs ``libaio``).
        swap_dir: the NVMe directory; DeepSpeed makes a folder per rank under it. Unused for ``"cpu"``.
        lr: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        clip: gradient clipping by global norm (0: none).
        settings: overrides of :data:`ZERO3_DEFAULTS`.

    Returns:
        The dict for ``deepspeed.zero.Init(config_dict_or_path=...)`` and ``deepspeed.initialize(config=...)``.

    Raises:
        ValueError: ``offload`` is neither ``"cpu"`` nor ``"nvme"``, or ``"nvme"`` without ``swap_dir``.
    """
    if offload not in ("cpu", "nvme"):
        raise ValueError(f"offload must be 'cpu' or 'nvme', not {offload!r}")
    if offload == "nvme" and not swap_dir:
        raise ValueError("offload='nvme' needs swap_dir, a directory on the disk to swap to")
    s = {**ZERO3_DEFAULTS, **(settings or {})}
    param: Dict[str, Any] = {"device": offload, "pin_memory": s["pin"]}
    opt: Dict[str, Any] = {"device": offload, "pin_memory": s["pin"]}
    if offload == "nvme":
        param.update(nvme_path=swap_dir, buffer_count=s["buffer_count"], buffer_size=s["buffer_size"],
                     max_in_cpu=s["max_in_cpu"])
        opt.update(nvme_path=swap_dir, buffer_count=s["opt_buffer_count"])
    # A persistence threshold of 0 partitions every parameter, small ones too, as FSDP2 does.
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
            "gradient_clipping": clip,
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}},
            "zero_optimization": {"stage": 3, "sub_group_size": s["sub_group_size"],
                                  "stage3_param_persistence_threshold": 0,
                                  "stage3_max_live_parameters": s["max_live"],
                                  "stage3_prefetch_bucket_size": s["prefetch"],
                                  "offload_param": param, "offload_optimizer": opt},
            "aio": {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": False,
                    "overlap_events": True}}


def failure_reason(stderr: str) -> str:
    """Why a run failed, from its stderr: the last exception raised, else the last line (may be empty)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    raised = [line for line in lines if _is_exception(line)]
    return (raised or lines or [""])[-1]


def _is_exception(line: str) -> bool:
    if line.startswith("[rank"):  # torchrun's prefix on a rank's output: "[rank0]: ValueError: ..."
        line = line.partition("]:")[2].strip()
    head, _, _ = line.partition(":")
    name = head.split(".")[-1]
    # torchrun's own summary (ChildFailedError) names the rank that failed, not the reason.
    return " " not in head and name.endswith(("Error", "Exception")) and name != "ChildFailedError"
