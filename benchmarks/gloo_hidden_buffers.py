"""How much memory each gloo collective holds beyond its own tensors (Note [hidden collective buffers]).

Runs itself under ``torchrun`` on this machine with 2 ranks (gloo, CPU tensors). For each
collective, rank 0 resets its peak RSS (``/proc/self/clear_refs``), runs the collective on tensors
that already exist, and reports how far ``VmHWM`` rose above the RSS before it: memory the process
group allocated in C++, which no operation (and so no dispatch mode) shows. Next to it, what
tierflow counts for that collective (``hidden_buffer_bytes``). glibc maps allocations of 1 MiB or
more on their own here, as a tierflow CPU run does, so a freed buffer leaves RSS.

Usage:
    python benchmarks/gloo_hidden_buffers.py              # 100 MiB tensors
    python benchmarks/gloo_hidden_buffers.py --mib 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

MiB = 1 << 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(mib: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from tierflow.offload.tiers import map_large_allocations
    from tierflow.profiling.collectives import COLLECTIVE_NAMESPACES, hidden_buffer_bytes
    from tierflow.trainer.distributed import end_process

    class Counted(TorchDispatchMode):
        """What tierflow would count for the collectives run under it."""

        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
            if func.namespace in COLLECTIVE_NAMESPACES:
                self.bytes += hidden_buffer_bytes(func, args)
            return func(*args, **(kwargs or {}))

    map_large_allocations()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = mib * MiB // 4
    full, out = torch.ones(n), torch.zeros(n)
    part = torch.zeros(n // world)
    parts: List[Any] = [torch.zeros(n // world) for _ in range(world)]

    def measure(name: str, run: Callable[[], Any]) -> None:
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        counted = Counted()
        with counted:
            run()
        dist.barrier()
        if rank == 0:
            grew = (_status("VmHWM") - before) / MiB
            print(f"{name:34s} hidden {grew:7.1f} MiB   counted {counted.bytes / MiB:7.1f} MiB", flush=True)

    with Counted():  # the first collective under a mode held 72 MiB more, once: not the buffer's
        dist.all_gather_into_tensor(out, part)
    if rank == 0:
        print(f"2 ranks, gloo, fp32 tensors of {mib} MiB (inputs of all-gathers: {mib // world} MiB per rank)")
    measure("all_gather_into_tensor (output)", lambda: dist.all_gather_into_tensor(out, part))
    measure("all_gather, list (outputs)", lambda: dist.all_gather(parts, part))
    measure("all_gather_into_tensor, async", lambda: dist.all_gather_into_tensor(out, part, async_op=True).wait())
    measure("reduce_scatter_tensor (input)", lambda: dist.reduce_scatter_tensor(part, full))
    measure("all_reduce", lambda: dist.all_reduce(full))
    measure("broadcast", lambda: dist.broadcast(full, 0))
    measure("all_to_all_single", lambda: dist.all_to_all_single(out, full))
    dist.barrier()
    end_process(0, held_group=True)  # Note [a finished rank exits without destructors]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=100, help="size of the full tensors")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.mib)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", "--mib", str(a.mib)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
