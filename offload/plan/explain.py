"""A plan shown to people: a text table of its decisions with their reasons, and a PNG.

Every decision carries its reason (idle window vs transfer time, tier chosen and why); these two
functions are the one place that renders them, for ``tierflow plan``, the trainer's run directory
and your own loop alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tierflow.offload.core.units import format_bytes
from tierflow.offload.plan.types import OffloadPlan, plan_memory
from tierflow.profiling.timeline import memory_timeline

__all__ = ["explain_plan", "plot_plan"]


def explain_plan(plan: OffloadPlan, limit: int = 200) -> str:
    """A text table of the plan: budgets and predictions, then one line per decision with its reason."""
    lines = [f"policy {plan.policy} on {plan.hardware or 'no hardware'}: {len(plan.decisions)} decisions, "
             f"device budget {format_bytes(plan.device_budget_bytes)} of unconstrained peak "
             f"{format_bytes(plan.unconstrained_peak_bytes)}; predicted peak "
             f"{format_bytes(plan.predicted_device_peak_bytes)}, step {plan.slowdown:.3f}x unconstrained, "
             f"stall {plan.predicted_stall_s * 1e3:.3f} ms",
             *(f"note: {n}" for n in plan.notes),
             f"{'key':<48} {'category':<16} {'bytes':>10} {'action':<9} {'tier':<8} {'evict':>6} {'free':>6} "
             f"{'fetch':>6} {'due':>6}  reason"]
    for d in plan.decisions[:limit]:
        lines.append(f"{d.key[:48]:<48} {d.category:<16} {format_bytes(d.size_bytes):>10} {d.action.value:<9} "
                     f"{d.tier or '-':<8} {d.evict_point:>6} {d.free_point:>6} {d.prefetch_point:>6} "
                     f"{d.deadline_point:>6}  {d.reason}")
    if len(plan.decisions) > limit:
        lines.append(f"... {len(plan.decisions) - limit} more decisions in plan.json")
    return "\n".join(lines)


def plot_plan(trace, plan, path: Path) -> Path:
    """PNG of the planned device memory per interval over the unplanned one (owner-only)."""
    # matplotlib is imported only when a plot is asked for: planning itself never needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = memory_timeline(trace).interval_peak_bytes
    planned = plan_memory(peak, plan.decisions, [])["device"]
    x = np.arange(len(peak))
    gib = float(1 << 30)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.step(x, np.asarray(peak) / gib, where="post", label="unplanned", color="0.6")
    ax.step(x, np.asarray(planned) / gib, where="post", label=f"planned ({plan.policy})", color="C0")
    ax.axhline(plan.device_budget_bytes / gib, color="C3", linestyle="--", label="device budget")
    ax.set_xlabel("point")
    ax.set_ylabel("device GiB")
    ax.set_title(f"{plan.policy}: predicted {plan.slowdown:.3f}x step time, {'fits' if plan.fits else 'does NOT fit'}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    os.chmod(path, 0o600)
    return path
