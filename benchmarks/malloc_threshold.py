"""What an RSS that follows live tensors costs on CPU: step time and peak RSS of the built-in GPT
under glibc's default allocation against ``map_large_allocations`` at several thresholds.

    python benchmarks/malloc_threshold.py [--thresholds-mib 1,4,16] [--layers 8 --width 768]

Each setting runs in a fresh process (a threshold is process-wide): six training steps of the same
model and batch; prints the median step time of the last five and the peak RSS (``ru_maxrss``,
measured), with ratios to glibc's default.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(threshold_mib: int, layers: int, width: int) -> None:
    import torch
    import torch.nn.functional as F

    from tierflow.offload.tiers._memory import map_large_allocations
    from tierflow.trainer.model import GPT, GPTConfig

    if threshold_mib:
        map_large_allocations(threshold_mib << 20)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, seq_len=128, n_layer=layers, n_head=12, d_model=width))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(statistics.median(times[1:]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds-mib", default="1,4,16")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.layers, args.width)
        return
    rows = []
    for mib in [0] + [int(t) for t in args.thresholds_mib.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--worker", str(mib), "--layers", str(args.layers),
                              "--width", str(args.width)], capture_output=True, text=True, check=True).stdout.split()
        rows.append((mib, float(out[0]), int(out[1])))
    base = rows[0]
    print(f"GPT {args.layers}x{args.width}, batch 4x128, fp32 AdamW, one process per setting")
    print(f"{'allocation':<22} {'median step':>11} {'x default':>9} {'peak RSS MiB':>13} {'x default':>9}")
    for mib, step, rss in rows:
        name = "glibc default" if not mib else f"mmap >= {mib} MiB"
        print(f"{name:<22} {step:>10.2f}s {step / base[1]:>9.2f} {rss / 2**20:>13,.0f} {rss / base[2]:>9.2f}")


if __name__ == "__main__":
    main()
