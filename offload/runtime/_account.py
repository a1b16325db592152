"""What a planned iteration holds on the device, as the plan executor accounts it.

On CPU nothing measures the device (it is RAM shared with everything else), so the executor
computes its figure from the plan's trace: per interval, the traced peak, minus the bytes it held
away, minus what recomputed blocks did not keep. When saved tensors had other sizes than the
plan's (Note [size reservations] in :mod:`tierflow.profiling.shapes`), the planned iteration is
replayed at the sizes this one had, allocation by allocation, so every interval's peak is the
peak of this iteration's own sizes, wherever in the interval it falls:

* a saved tensor (the runtime sees each one) has its real size, smaller or larger than its
  reservation (larger only when the plan left that much of the budget unused at its peak: its
  *slack*);
* a temporary planned at a reservation, which nobody sees on a planned step, is replayed at the
  largest fraction of their reservations its scope's saved tensors used in this iteration (Note
  [temporaries follow their scope] in :mod:`tierflow.profiling.shapes`);
* what a module call the iteration did not make would have saved, and its parameters'
  gradients, are replayed at no size (Note [module calls not made]; temporaries keep theirs:
  a temporary's key names the point before it, which may be another module's).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Set

from tierflow.offload.runtime._schedule import Schedule, made_within
from tierflow.profiling.timeline import memory_timeline

__all__ = ["SizeAccount"]


class SizeAccount:
    """One iteration's account: bytes held away per interval and saved tensors' real sizes.

    Args:
        schedule: The plan's schedule (interval peaks, sizes, the planned trace).
        slack_bytes: Budget minus the plan's predicted peak: room larger tensors may take.
    """

    def __init__(self, schedule: Schedule, slack_bytes: int) -> None:
        self.schedule, self.slack_bytes = schedule, slack_bytes
        self.begin()

    def begin(self) -> None:
        """A new iteration: forget the last one's figures."""
        self.absent_at: List[int] = []  # per matched interval: the fewest bytes held away during it
        self.checkpointed: Set[str] = set()  # recomputed blocks whose forward ran checkpointed
        self.real: Dict[str, int] = {}  # key -> its size in this iteration, where not the plan's
        self.excess_bytes = 0  # bytes above reservations, taken from the slack
        self.outgrown: Dict[str, int] = {}  # key -> bytes seen above its reservation (the runtime re-plans)
        self.used: Dict[str, float] = {}  # module path -> the largest fraction of a reservation its saved tensors used
        self.not_made: Set[str] = set()  # modules whose calls the iteration skipped (Note [module calls not made])

    def saved(self, key: str, nbytes: int, following: bool) -> Optional[str]:
        """A saved tensor of ``nbytes`` got ``key``; returns why it leaves the plan, or None.

        Args:
            following: Whether the iteration still follows the plan (sizes are recorded for the
                runtime either way).
        """
        size = self.schedule.sizes.get(key)
        if key in self.schedule.varying and size:
            path = key.partition("[")[0]
            self.used[path] = max(self.used.get(path, 0.0), nbytes / size)
        if size is not None and nbytes > size:
            self.outgrown[key] = max(nbytes, self.outgrown.get(key, 0))
        if not following:
            return None
        if size is not None and size < nbytes <= size + self.slack_bytes - self.excess_bytes:
            self.excess_bytes += nbytes - size
            self.real[key] = nbytes
        elif size is None or key not in self.schedule.activations or nbytes > size:
            return (f"saved tensor {key!r} of {nbytes} bytes is not in the trace"
                    + (f" (the plan reserved {size} bytes)" if size is not None else ""))
        elif nbytes < size:
            self.real[key] = nbytes
        return None

    def fits(self, key: str, nbytes: int, size: int) -> bool:
        """Whether a tensor of ``nbytes`` is one the plan's decision of ``size`` bytes covers."""
        if nbytes <= max(size, self.real.get(key, 0)):
            return True
        self.outgrown[key] = max(nbytes, self.outgrown.get(key, 0))
        return False

    def resident_at(self) -> List[int]:
        """Per matched interval, the device bytes accounted (see the module docstring)."""
        schedule = self.schedule
        recomputed = [schedule.recomputed[b] for b in self.checkpointed if b in schedule.recomputed]
        peaks = self._interval_peaks()
        return [peaks[p] - a - sum(r[p] for r in recomputed) for p, a in enumerate(self.absent_at)]

    def _interval_peaks(self) -> Sequence[int]:
        """The planned trace's peak per interval at this iteration's sizes."""
        schedule = self.schedule
        sizes = dict(self.real)
        for key, (scope, reserved) in schedule.scaled.items():
            inner = scope + "."
            used = max((f for path, f in self.used.items() if path == scope or path.startswith(inner)), default=1.0)
            if used < 1.0:
                sizes[key] = math.ceil(used * reserved)
        trace = schedule.trace
        if self.not_made and trace is not None:  # what calls not made would have saved never existed
            sizes.update({r.key: 0 for r in trace.tensors
                          if r.category.value in ("activation", "grad") and made_within(r.key, self.not_made)})
        if not sizes or trace is None:
            return schedule.interval_peak
        tensors = tuple(replace(r, size_bytes=sizes[r.key]) if r.key in sizes else r for r in trace.tensors)
        return memory_timeline(replace(trace, tensors=tensors)).interval_peak_bytes
