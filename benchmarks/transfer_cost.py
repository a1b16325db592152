"""The runtime's Python cost per transfer: offload, free, prefetch and arrive of many small tensors
through the residency table and the host tier (issue 17: at LLM scale thousands of saved tensors
move per step, and the per-transfer work runs on the training thread).

    python benchmarks/transfer_cost.py [--tensors 2000] [--bytes 4096,65536] [--rounds 3] [--device cuda]

Prints microseconds per tensor for each action and the round trip, the median of the rounds, two
ways in one run: one tensor per transfer, and the way the executor moves a point's tensors, its
offloads and its prefetches each in one batch (Note [packs]: the small ones share one transfer).
Small tensors make the copy itself negligible: what is left is bookkeeping, the tier worker's
hand-off and the GIL.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tierflow.offload import HostTierConfig, TiersConfig  # noqa: E402
from tierflow.offload.runtime._residency import Residency  # noqa: E402
from tierflow.offload.tiers.engine import TierEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--bytes", default="4096,65536")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cuda: device tensors, copies stream-ordered (host time only)")
    args = ap.parse_args()
    n = args.tensors
    print(f"{n} {args.device} tensors per round, host tier, median of {args.rounds} rounds; microseconds per tensor")
    print(f"{'size':>8} {'how':>9} {'offload':>8} {'free':>6} {'prefetch':>9} {'arrive':>7} {'round trip':>11} {'ratio':>6}")
    for size in (int(b) for b in args.bytes.split(",")):
        single = _measure(n, size, args.rounds, args.device, batched=False)
        packed = _measure(n, size, args.rounds, args.device, batched=True)
        for how, med in (("single", single), ("batched", packed)):
            ratio = f"{sum(med) / sum(single):.2f}" if how == "batched" else ""
            print(f"{size:>8} {how:>9} {med[0]:>8.1f} {med[1]:>6.1f} {med[2]:>9.1f} {med[3]:>7.1f} {sum(med):>11.1f} {ratio:>6}")


def _measure(n: int, size: int, rounds: int, device: str, batched: bool) -> List[float]:
    budget = -(-2 * n * size // (1 << 24)) << 24
    cfg = TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=budget, slab_bytes=1 << 24))
    with TierEngine(cfg) as engine:
        table = Residency(lambda name: engine.tiers["host"])
        batch = table.batch if batched else contextlib.nullcontext
        tensors = [torch.randn(size // 4, device=device) for _ in range(n)]
        keep = [t.clone() for t in tensors]
        rows = []
        for _ in range(rounds):
            marks = [time.perf_counter()]
            with batch():
                for i, t in enumerate(tensors):
                    table.offload(f"t{i}", t.untyped_storage(), "host")
            marks.append(time.perf_counter())
            for action, batched_action in ((table.release, False), (table.prefetch, True), (table.arrive, False)):
                with batch() if batched_action else contextlib.nullcontext():
                    for i in range(n):
                        action(f"t{i}")
                marks.append(time.perf_counter())
            rows.append([(b - a) / n * 1e6 for a, b in zip(marks, marks[1:])])
            if device != "cpu":
                torch.cuda.synchronize()  # outside the timings: they are the host's cost of issuing
        assert all(torch.equal(a, b) for a, b in zip(tensors, keep))  # every byte came back
        return [statistics.median(col) for col in zip(*rows)]


if __name__ == "__main__":
    main()
