"""Turn a trace into what a person reads: a text summary and a PNG of the memory timeline.

``format_report`` is pure (trace in, text out); ``plot_memory_timeline`` and ``write_report``
write files (owner-only). The PNG is made with matplotlib's Agg backend: no display, no browser.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tierflow.profiling.idle import top_idle_tensors
from tierflow.profiling.stability import check_stability
from tierflow.profiling.timeline import CATEGORIES, active_fraction, memory_timeline
from tierflow.profiling.trace import Category, LifetimeTrace, Phase, PointKind

__all__ = ["TERAIO_ACTIVE_FRACTION", "ReportFiles", "format_bytes", "format_report", "phase_compute_s",
           "plot_memory_timeline", "write_report"]

#: TERAIO's measured share of allocated GPU memory that is active per kernel, on average.
TERAIO_ACTIVE_FRACTION = 0.017

_COLORS = {
    Category.PARAM: "#4c72b0", Category.GRAD: "#dd8452", Category.OPTIMIZER_STATE: "#55a868",
    Category.ACTIVATION: "#c44e52", Category.TEMPORARY: "#8172b3", Category.INPUT: "#937860",
    Category.BUFFER: "#da8bc3",
}
_PHASE_COLORS = {Phase.FORWARD: "#dbe9f6", Phase.BACKWARD: "#fde6d2", Phase.OPTIMIZER: "#dcefdc"}


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` put its outputs."""

    summary: Path
    plot: Optional[Path]


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def phase_compute_s(trace: LifetimeTrace) -> Dict[Phase, float]:
    """Measured compute per phase, summed over all iterations (interval ``p`` has ``points[p]``'s phase)."""
    out: Dict[Phase, float] = defaultdict(float)
    for before, after in zip(trace.points, trace.points[1:]):
        if before.kind is not PointKind.ITERATION_END:  # the gap between iterations is not traced
            out[before.phase] += after.compute_s
    return dict(out)


def format_report(trace: LifetimeTrace, *, top: int = 10) -> str:
    """The text summary: peak, bytes per category at the peak, stability, active fraction, top tensors.

    Args:
        trace: A trace.
        top: How many tensors to list by bytes x idle time.

    Returns:
        Lines of text (no trailing newline).
    """
    timeline = memory_timeline(trace)
    peak = timeline.peak
    at = trace.points[peak.point]
    stability = check_stability(trace)
    active = active_fraction(trace)
    phases = phase_compute_s(trace)
    k = trace.num_iterations
    who = trace.model + (f" + {trace.optimizer}" if trace.optimizer else "")
    lines: List[str] = [
        f"tierflow: lifetime trace of {who} on {trace.device} ({k} iteration{'s' if k > 1 else ''}, "
        f"{len(trace.points):,} points, {len(trace.tensors):,} tensors)",
        f"  peak          {format_bytes(peak.total_bytes)} in interval {peak.point} "
        f"(after {at.label}, iteration {at.iteration}, {at.phase.value})",
        "  at the peak   " + " | ".join(f"{c.value} {format_bytes(b)}" for c, b in
                                        sorted(peak.by_category, key=lambda cb: -cb[1]) if b),
        f"  stability     {stability.describe()}",
        f"  active        {active.mean:.1%} of allocated bytes used per point interval on average "
        f"(TERAIO reports {TERAIO_ACTIVE_FRACTION:.1%} per kernel)",
        f"  compute       {sum(phases.values()) / k * 1e3:,.1f} ms per iteration measured between points ("
        + ", ".join(f"{ph.value} {phases.get(ph, 0.0) / k * 1e3:,.1f} ms" for ph in Phase) + ")",
    ]
    scores = top_idle_tensors(trace, top)
    if scores:
        lines.append(f"  top {len(scores)} tensors by bytes x idle time (per iteration):")
        width = max(len(s.key) for s in scores)
        for i, s in enumerate(scores, 1):
            lines.append(f"    {i:>2}. {s.key:<{width}}  {s.category.value:<15} {format_bytes(s.size_bytes):>10}  "
                         f"idle {s.idle_s * 1e3:9.2f} ms  {s.byte_seconds / 2**20:10.3f} MiB*s")
    return "\n".join(lines)


def _phase_runs(trace: LifetimeTrace) -> List[Tuple[int, int, Phase]]:
    """Maximal runs ``[start, end)`` of consecutive intervals sharing a phase."""
    runs: List[Tuple[int, int, Phase]] = []
    for i, p in enumerate(trace.points):
        if runs and runs[-1][2] is p.phase and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1, p.phase)
        else:
            runs.append((i, i + 1, p.phase))
    return runs


def plot_memory_timeline(trace: LifetimeTrace, path: Path) -> Path:
    """Write a PNG: live bytes stacked by category over the points, phases shaded, the peak marked.

    Args:
        trace: A trace.
        path: The PNG to write (owner-only).

    Returns:
        ``path``.
    """
    # matplotlib costs about a second to import: only when a plot is written.
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib costs about a second to import: only when a plot is written.
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    timeline = memory_timeline(trace)
    mib = 2.0**20
    xs = list(range(len(trace.points)))
    fig, ax = plt.subplots(figsize=(13, 5), dpi=110)
    for start, end, phase in _phase_runs(trace):
        if phase in _PHASE_COLORS:
            ax.axvspan(start, end, color=_PHASE_COLORS[phase], lw=0, zorder=0)
    shown = [i for i, c in enumerate(CATEGORIES) if any(row[i] for row in timeline.live_bytes)]
    ax.stackplot(xs, *[[row[i] / mib for row in timeline.live_bytes] for i in shown], step="post",
                 colors=[_COLORS[CATEGORIES[i]] for i in shown], labels=[CATEGORIES[i].value for i in shown],
                 zorder=2, alpha=0.9)
    ax.step(xs, [b / mib for b in timeline.interval_peak_bytes], where="post", color="black", lw=0.8,
            label="peak within interval", zorder=3)
    for start, _ in trace.iteration_bounds()[1:]:
        ax.axvline(start, color="gray", ls="--", lw=0.8, zorder=1)
    peak = timeline.peak
    ax.plot([peak.point + 0.5], [peak.total_bytes / mib], "v", color="black", zorder=4)
    ax.annotate(f"peak {format_bytes(peak.total_bytes)}\n{trace.points[peak.point].label}",
                (peak.point + 0.5, peak.total_bytes / mib), textcoords="offset points", xytext=(8, -4),
                fontsize=8, va="top")
    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=c, label=f"{ph.value} phase") for ph, c in _PHASE_COLORS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    ax.set_xlim(0, max(len(xs) - 1, 1))
    ax.set_ylim(0, peak.total_bytes / mib * 1.25 or 1)
    ax.set_xlabel("runtime point (module forward/backward hooks, gradient ready, optimizer step), in order")
    ax.set_ylabel("live traced tensors (MiB)")
    who = trace.model + (f" + {trace.optimizer}" if trace.optimizer else "")
    ax.set_title(f"Memory timeline of {who} on {trace.device}: {trace.num_iterations} iteration(s), "
                 f"dashed lines separate iterations")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    os.chmod(path, 0o600)
    return path


def write_report(trace: LifetimeTrace, out_dir: Path, *, top: int = 10, plot: bool = True) -> ReportFiles:
    """Write ``profile.txt`` (the summary) and ``memory.png`` into ``out_dir`` (created 0700 if missing).

    Args:
        trace: A trace.
        out_dir: Destination directory.
        top: Tensors listed by bytes x idle time.
        plot: False skips the PNG.

    Returns:
        The two paths.

    Raises:
        ValueError: ``out_dir`` exists and is not a directory, or cannot be created.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{out_dir} exists and is not a directory; pass --out with a directory path") from None
    except OSError as exc:
        raise ValueError(f"cannot create {out_dir} ({exc.strerror}); pass --out with a writable directory") from None
    summary = out_dir / "profile.txt"
    fd = os.open(summary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(format_report(trace, top=top) + "\n")
    os.chmod(summary, 0o600)
    return ReportFiles(summary=summary, plot=plot_memory_timeline(trace, out_dir / "memory.png") if plot else None)
