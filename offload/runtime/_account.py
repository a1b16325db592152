"""What a planned iteration holds on the device, as the plan executor accounts it.

On CPU nothing measures the device (it is RAM shared with everything else), so the executor
computes its figure from the plan's trace: per interval, the traced peak, minus the bytes it held
away, minus what recomputed blocks did not keep, corrected for saved tensors whose size differs
from the plan's (Note [size reservations] in :mod:`tierflow.profiling.shapes`):

* a tensor smaller than its reservation leaves the difference unused in every interval it spans
  from start to end (in the intervals where it is made or freed the peak may fall before or
  after it exists, so nothing is subtracted there: the figure never reads low);
* a tensor larger than its reservation, let through because the plan left that much of the
  budget unused at its peak (its *slack*), adds the difference to every interval it touches.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set

from tierflow.offload.runtime._schedule import Schedule

__all__ = ["SizeAccount"]


class SizeAccount:
    """One iteration's account: bytes held away per interval and saved tensors' real sizes.

    Args:
        schedule: The plan's schedule (interval peaks, sizes, spans).
        slack_bytes: Budget minus the plan's predicted peak: room larger tensors may take.
    """

    def __init__(self, schedule: Schedule, slack_bytes: int) -> None:
        self.schedule, self.slack_bytes = schedule, slack_bytes
        self.begin()

    def begin(self) -> None:
        """A new iteration: forget the last one's figures."""
        self.absent_at: List[int] = []  # per matched interval: the fewest bytes held away during it
        self.checkpointed: Set[str] = set()  # recomputed blocks whose forward ran checkpointed
        self.shortfall: Dict[str, int] = {}  # key -> bytes below its reservation
        self.excess: Dict[str, int] = {}  # key -> bytes above it, taken from the slack
        self.excess_bytes = 0  # their sum
        self.outgrown: Dict[str, int] = {}  # key -> bytes seen above its reservation (the runtime re-plans)

    def saved(self, key: str, nbytes: int, following: bool) -> Optional[str]:
        """A saved tensor of ``nbytes`` got ``key``; returns why it leaves the plan, or None.

        Args:
            following: Whether the iteration still follows the plan (sizes are recorded for the
                runtime either way).
        """
        size = self.schedule.sizes.get(key)
        if size is not None and nbytes > size:
            self.outgrown[key] = max(nbytes, self.outgrown.get(key, 0))
        if not following:
            return None
        if size is not None and size < nbytes <= size + self.slack_bytes - self.excess_bytes:
            self.excess[key] = nbytes - size
            self.excess_bytes += nbytes - size
        elif size is None or key not in self.schedule.activations or nbytes > size:
            return (f"saved tensor {key!r} of {nbytes} bytes is not in the trace"
                    + (f" (the plan reserved {size} bytes)" if size is not None else ""))
        elif nbytes < size:
            self.shortfall[key] = size - nbytes
        return None

    def fits(self, key: str, nbytes: int, size: int) -> bool:
        """Whether a tensor of ``nbytes`` is one the plan's decision of ``size`` bytes covers."""
        if nbytes <= size + self.excess.get(key, 0):
            return True
        self.outgrown[key] = max(nbytes, self.outgrown.get(key, 0))
        return False

    def resident_at(self) -> List[int]:
        """Per matched interval, the device bytes accounted (see the module docstring)."""
        schedule = self.schedule
        recomputed = [schedule.recomputed[b] for b in self.checkpointed if b in schedule.recomputed]
        n = len(self.absent_at)
        delta = [0] * (n + 1)

        def add(first: int, last: int, b: int) -> None:
            first, last = max(first, 0), min(last, n - 1)
            if first <= last:
                delta[first] += b
                delta[last + 1] -= b

        for key, short in self.shortfall.items():
            first, last = schedule.spans.get(key, (1, 0))
            add(first, last, -short)
        for key, extra in self.excess.items():
            first, last = schedule.spans.get(key, (1, 0))
            add(first - 1, last + 1, extra)
        out, running = [], 0
        for p, a in enumerate(self.absent_at):
            running += delta[p]
            out.append(schedule.interval_peak[p] - a - sum(r[p] for r in recomputed) + running)
        return out
