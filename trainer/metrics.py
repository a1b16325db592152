"""Per-step metrics: peak memory, the run directory, wandb and the local metrics file, the loss plot.

Only rank 0 writes. Everything a run produces lands in one run directory, created owner-only
(0700) once the config has been validated.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import textwrap
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil
import torch
from tqdm.auto import tqdm

from tierflow.trainer._scratch import default_tempdir, process_scratch_dir
from tierflow.trainer.config import LoggingConfig

__all__ = ["MetricsSink", "NoSink", "make_run_dir", "open_sink", "peak_memory_bytes", "plot_losses", "progress_bar",
           "reset_peak_memory"]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the CUDA allocator's high-water mark on GPU, the process RSS on CPU.

    On CPU the figure is the larger of the current RSS (psutil) and the kernel's high-water mark
    (``ru_maxrss``), so a spike between two samples is not missed.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = psutil.Process().memory_info().rss
    return max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def make_run_dir(cfg: LoggingConfig, model_name: str) -> Path:
    """Create ``run_root/run_name`` (default ``<timestamp>-<model>``) readable by the owner only.

    Raises:
        ValueError: the run directory already holds a finished run, or cannot be created.
    """
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}"
    run_dir = Path(cfg.run_root).expanduser().resolve() / name
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir} already holds a finished run; choose another logging.run_name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ValueError(f"cannot create the run directory {run_dir} ({exc.strerror}); "
                         "set logging.run_root to a writable directory") from None
    os.chmod(run_dir, 0o700)
    return run_dir


class MetricsSink:
    """Writes one JSON line per step to ``metrics.jsonl`` and, when enabled, to wandb."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: Dict[str, Any]) -> None:
        self.run_dir = run_dir
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1, opener=_private_opener)
        self._wandb = None
        if cfg.backend == "wandb":
            # wandb is slow to import: only with logging.backend=wandb. Importing it makes two temp
            # directories (wandb-media, wandb-artifacts) and starting it one more, which only a clean
            # exit removes: they go into this process's scratch directory, which the next tierflow
            # process removes if this one is killed (Note [whose scratch directory]).
            with default_tempdir(process_scratch_dir()):
                import wandb

                mode = cfg.mode if cfg.mode != "auto" else ("online" if cfg.project else "offline")
                self._wandb = wandb.init(
                    project=cfg.project or "tierflow", entity=cfg.entity, name=run_dir.name,
                    dir=str(run_dir), mode=mode, config=config,
                    settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
                )

    def log(self, step: int, values: Dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def finish(self, summary: Dict[str, Any]) -> None:
        with open(self.run_dir / "summary.json", "w", opener=_private_opener) as f:
            json.dump(summary, f, indent=2, default=_jsonable)
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self._wandb.finish()
        self._file.close()

    def close_on_error(self) -> None:
        if self._wandb is not None:
            self._wandb.finish(exit_code=1)
        self._file.close()


class NoSink:
    """The :class:`MetricsSink` of ranks other than 0: logs nothing."""

    def log(self, step: int, values: Dict[str, float]) -> None:
        pass

    def finish(self, summary: Dict[str, Any]) -> None:
        pass

    def close_on_error(self) -> None:
        pass


def open_sink(cfg: LoggingConfig, run_dir: Path, config: Dict[str, Any], *, is_main: bool):
    """Rank 0's :class:`MetricsSink`; a :class:`NoSink` elsewhere."""
    return MetricsSink(cfg, run_dir, config) if is_main else NoSink()


def plot_losses(records: List[Dict[str, Any]], path: Path, title: str, floor: Optional[float] = None) -> None:
    """A PNG of train (and val) loss against step, with the data's loss floor when known."""
    # matplotlib costs about a second to import: only when a plot is written.
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib costs about a second to import: only when a plot is written.
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.2)
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label=f"data loss floor {floor:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    os.chmod(path, 0o600)
    plt.close(fig)


def progress_bar(total: int, desc: str, *, enabled: bool = True):
    """The rank-0 progress bar of a loop over ``total`` optimizer steps (on stderr).

    With ``enabled=False`` (other ranks, ``logging.progress=false``) the same object is returned
    switched off, so loops call ``update``/``set_postfix``/``close`` unconditionally.
    """
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                disable=not enabled)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
