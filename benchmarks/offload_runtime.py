"""Tokens/s of the built-in GPT under the plan runtime at a device budget, next to its peers.

Five ways to run the same training steps, in one process, alternating rounds so drift of a shared
machine hits all of them: unconstrained; tierflow (``lifetime``) with the host tier; tierflow with
the NVMe tier (a swap directory); torch's ``save_on_cpu``; activation checkpointing of every block.
Every variant trains the same model from the same seed on the same batches; the losses are
checked to be bit-identical to the unconstrained run. Device peaks: tierflow's as its runtime
accounts them (trace peak per interval minus the bytes held away); checkpointing's measured by
the LifetimeTracer on one of its steps; ``save_on_cpu``'s is the unconstrained peak minus the
saved activations at the peak (on a CPU-only machine its copies land in the same memory, so it
cannot be measured apart).

    .venv/bin/python benchmarks/offload_runtime.py --steps 12 --repeats 3 --budget 0.5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from _gpt_step import train_step

from tierflow.offload import HostTierConfig, NvmeTierConfig, OffloadConfig, OffloadRuntime, TiersConfig
from tierflow.profiling import Category, LifetimeTracer, TracerConfig, memory_timeline
from tierflow.trainer.metrics import progress_bar
from tierflow.trainer.model import GPT, GPTConfig


def make(args):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, seq_len=args.seq, n_layer=args.layers, n_head=4, d_model=args.width))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def batches(args, n):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (args.batch, args.seq), generator=gen) for _ in range(n)]


class Variant:
    def __init__(self, name, args, tiers=None, save_on_cpu=False, per_block=False):
        self.name, self.args, self.tiers = name, args, tiers
        self.save_on_cpu, self.per_block = save_on_cpu, per_block
        self.model, self.opt = make(args)
        self.rt = None
        if tiers is not None:
            self.rt = OffloadRuntime(self.model, self.opt, OffloadConfig(policy="lifetime",
                                     device_budget_fraction=args.budget), tiers=tiers,
                                     tracer_config=TracerConfig(subtract_dispatch_cost=False))
        self.times, self.losses = [], []

    def run(self, x, timed=True):
        t0 = time.perf_counter()
        ctx = self.rt.step(x) if self.rt else (torch.autograd.graph.save_on_cpu() if self.save_on_cpu else nullcontext())
        with ctx:
            loss = train_step(self.model, self.opt, x, self.per_block)
        if timed:
            self.times.append(time.perf_counter() - t0)
        self.losses.append(loss)


def traced_peak(args, per_block, data):
    model, opt = make(args)
    train_step(model, opt, data[0], per_block)  # optimizer state exists, as in every later step
    tracer = LifetimeTracer(model, opt, TracerConfig(subtract_dispatch_cost=False))
    with tracer:
        with tracer.iteration():
            tracer.mark_inputs(data[1])
            train_step(model, opt, data[1], per_block)
    return memory_timeline(tracer.trace()).peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (A B C D E, A B C D E, ...)")
    ap.add_argument("--budget", type=float, default=0.5, help="device budget, fraction of the unconstrained peak")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--png", default="docs/img/offload_runtime.png")
    args = ap.parse_args()
    warm = 4  # runtime: 1 warm-up + 2 profiled steps + its first planned step, untimed for everyone
    data = batches(args, warm + args.steps * args.repeats)
    swap = tempfile.mkdtemp(prefix="tf-bench-nvme-")
    variants = [
        Variant("unconstrained", args),
        Variant("tierflow host", args, TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=4 << 30))),
        Variant("tierflow nvme", args, TiersConfig(nvme=NvmeTierConfig(enabled=True, dirs=[swap],
                                                                       budget_bytes=8 << 30, preallocate=False))),
        Variant("save_on_cpu", args, save_on_cpu=True),
        Variant("checkpoint every block", args, per_block=True),
    ]
    bar = progress_bar(len(variants) * len(data), "offload_runtime")
    for v in variants:  # one after the other: two runtimes profiling at once would stack tracers
        for x in data[:warm]:
            v.run(x, timed=False)
            bar.update(1)
    for r in range(args.repeats):
        chunk = data[warm + r * args.steps: warm + (r + 1) * args.steps]
        for v in variants:
            for x in chunk:
                v.run(x)
                bar.update(1)
    bar.close()
    tokens = args.batch * args.seq
    ref = variants[0]
    base = traced_peak(args, False, data)
    ckpt_peak = traced_peak(args, True, data).total_bytes
    rows = []
    for v in variants:
        exact = all(torch.equal(a, b) for a, b in zip(ref.losses, v.losses))
        tps = tokens / statistics.median(v.times)
        if v.rt is not None:
            peak = v.rt.summary()["device_peak_bytes"]
        elif v.save_on_cpu:
            peak = base.total_bytes - base.bytes_of(Category.ACTIVATION)
        elif v.per_block:
            peak = ckpt_peak
        else:
            peak = base.total_bytes
        rows.append((v.name, tps, tps / (tokens / statistics.median(ref.times)), peak, exact))
        if v.rt is not None:
            v.rt.close()
    print(f"GPT {args.layers}x{args.width}, seq {args.seq}, batch {args.batch}; budget {args.budget:.0%} of the "
          f"unconstrained peak {base.total_bytes / 2**20:.1f} MiB; medians of {args.repeats}x{args.steps} steps")
    print(f"{'variant':<24} {'tokens/s':>10} {'vs unconstrained':>17} {'device peak':>12} {'bit-identical':>14}")
    for name, tps, ratio, peak, exact in rows:
        print(f"{name:<24} {tps:>10,.0f} {ratio:>16.3f}x {peak / 2**20:>9.1f} MiB {str(exact):>14}")
    plot(rows, args, Path(args.png))


def plot(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r[0] for r in rows]
    a.barh(names, [r[2] for r in rows], color=["0.6", "C0", "C1", "C2", "C3"])
    a.axvline(0.9, color="k", ls="--", lw=1, label="0.9x goal")
    a.set_xlabel("tokens/s relative to unconstrained")
    a.invert_yaxis()
    a.legend()
    b.barh(names, [r[3] / 2**20 for r in rows], color=["0.6", "C0", "C1", "C2", "C3"])
    b.axvline(rows[0][3] * args.budget / 2**20, color="C3", ls="--", lw=1, label=f"{args.budget:.0%} budget")
    b.set_xlabel("device peak (MiB)")
    b.invert_yaxis()
    b.legend()
    fig.suptitle(f"GPT {args.layers}x{args.width}, seq {args.seq}, batch {args.batch} on CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
