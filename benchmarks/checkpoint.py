"""In-memory snapshots against torch.save and DCP async_save, all measured in one run.

    python benchmarks/checkpoint.py [--layers 8 --d-model 512 --rounds 8 --block 3 --out docs/img/checkpoint.png]

Prints three ratios (the issue's goals in brackets):

1. step time with a snapshot after every step / without snapshots   [<= 1.03x]; the two modes
   alternate in blocks of ``--block`` steps (the first step of a block is not timed: it has no
   copy of a previous snapshot under it), ``--rounds`` times, so machine noise hits both alike
2. training-visible stall of one snapshot vs torch.save of the same state to local disk, and vs
   torch.distributed.checkpoint.async_save's blocking part           [>= 10x smaller than torch.save]
3. restore from memory (the node's store) vs from the DCP checkpoint on disk, page cache dropped
   for the checkpoint's files                                          [>= 5x faster]

Every figure is a median of measurements in one process on this machine; the load average
before and after is printed, since other work on the same cores shifts every figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tierflow.trainer.checkpoint._state import apply_state  # noqa: E402
from tierflow.trainer.checkpoint.persist import find_checkpoints, load_checkpoint  # noqa: E402
from tierflow.trainer.checkpoint.recovery import restore_latest  # noqa: E402
from tierflow.trainer.checkpoint.snapshotter import Snapshotter  # noqa: E402
from tierflow.trainer.checkpoint.store import StoreClient  # noqa: E402
from tierflow.trainer.config import DataConfig, ModelConfig, OptimizerConfig  # noqa: E402
from tierflow.trainer.data import ShardedLoader, SyntheticMarkov  # noqa: E402
from tierflow.trainer.metrics import progress_bar  # noqa: E402
from tierflow.trainer.model import build_model  # noqa: E402
from tierflow.trainer.optim import build_optimizer  # noqa: E402
from tierflow.trainer.step import train_step  # noqa: E402


def _parts(args):
    torch.manual_seed(0)
    data = DataConfig(vocab_size=256, seq_len=args.seq_len)
    model = build_model(ModelConfig(n_layer=args.layers, d_model=args.d_model, n_head=8), vocab_size=256,
                        seq_len=args.seq_len)
    opt, sched = build_optimizer(model, OptimizerConfig(), 1000)
    loader = ShardedLoader(SyntheticMarkov(data, 0), global_batch=args.batch, grad_accum=1, rank=0, world_size=1,
                           device=torch.device("cpu"))
    return model, opt, sched, loader


def _state_bytes(model, opt) -> int:
    n = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return n + sum(v.numel() * v.element_size() for st in opt.state_dict()["state"].values()
                   for v in st.values() if isinstance(v, torch.Tensor))


def _drop_cache(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8, help="blocks per mode, alternating")
    p.add_argument("--block", type=int, default=3, help="steps per block (the first is not timed)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the save and restore measurements")
    p.add_argument("--out", default="docs/img/checkpoint.png")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tfbench-", dir="/tmp"))
    store = StoreClient(work / "st", "bench")
    model, opt, sched, loader = _parts(args)
    snap = Snapshotter(model=model, optimizer=opt, scheduler=sched, store=store, rank=0, world_size=1,
                       run_key="bench0000000", config_hash="bench", holders=None, k=1, m=0, group=None,
                       persist_dir=work / "dcp")
    opt.register_step_pre_hook(lambda *_: snap.wait_safe())
    step = 0
    load_before = os.getloadavg()
    bar = progress_bar(2 * args.block * args.rounds, "steps")

    def run(n: int, snapshot: bool):
        nonlocal step
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            train_step(model, opt, loader.micro_batches(step), None, 1.0)
            sched.step()
            step += 1
            if snapshot:
                snap.snapshot(step)
            times.append(time.perf_counter() - t0)
            bar.update(1)
        return times[1:]  # the first step of a block has no snapshot copy under it

    plain, snapped = [], []
    stall_s, copy_s, num = 0.0, 0.0, 0
    for _ in range(args.rounds):
        plain += run(args.block, False)
        s0, c0, n0 = snap.stall_s, snap.copy_s, snap.num_snapshots
        snapped += run(args.block, True)
        snap.drain()  # not timed: the next plain block starts with no copy in flight
        stall_s, copy_s, num = stall_s + snap.stall_s - s0, copy_s + snap.copy_s - c0, num + snap.num_snapshots - n0
    bar.close()
    state_mib = _state_bytes(model, opt) / 2**20
    stall_ms = stall_s / num * 1e3
    copy_ms = copy_s / num * 1e3

    # One snapshot's stall against torch.save and DCP async_save of the same state.
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    save_ms, async_ms = [], []
    import torch.distributed.checkpoint as dcp

    for i in range(args.repeats):
        t0 = time.perf_counter()
        torch.save(sd, work / f"save{i}.pt")
        save_ms.append((time.perf_counter() - t0) * 1e3)
        os.unlink(work / f"save{i}.pt")
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=str(work / f"async{i}"), no_dist=True)
        async_ms.append((time.perf_counter() - t0) * 1e3)
        fut.result()
        shutil.rmtree(work / f"async{i}")

    # Restore: from the store vs from a DCP checkpoint written by the same snapshot engine.
    snap.snapshot(step, persist=True)
    snap.drain()
    ckpt = find_checkpoints(work / "dcp")[0][1]
    mem_s, disk_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = restore_latest(snap, gather=lambda x: [x], broadcast=lambda x: x, persist_dir=work / "none",
                             nodes=["bench"], restore="memory")
        mem_s.append(time.perf_counter() - t0)
        assert res is not None and res.step == step
        _drop_cache(ckpt)
        t0 = time.perf_counter()
        tensors, meta = load_checkpoint(ckpt, 0)
        apply_state(model, opt, sched, tensors, meta, rng=meta["rng"])
        disk_s.append(time.perf_counter() - t0)
    snap.close()
    store.stop()
    shutil.rmtree(work, ignore_errors=True)

    step_ratio = median(snapped) / median(plain)
    load_after = os.getloadavg()
    lines = [
        f"machine: {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after",
        f"model: GPT {args.layers}x{args.d_model}, training state {state_mib:,.0f} MiB (params + AdamW)",
        f"step time: {median(plain) * 1e3:,.0f} ms plain, {median(snapped) * 1e3:,.0f} ms with a snapshot every "
        f"step -> {step_ratio:.3f}x [goal <= 1.03x] (medians of {len(plain)} / {len(snapped)} steps; "
        f"background copy+hash {copy_ms:,.0f} ms wall per snapshot)",
        f"stall of one snapshot: {stall_ms:,.1f} ms; torch.save {median(save_ms):,.0f} ms "
        f"({median(save_ms) / stall_ms:,.1f}x larger) [goal >= 10x]; DCP async_save blocks {median(async_ms):,.0f} ms "
        f"({median(async_ms) / stall_ms:,.1f}x larger)",
        f"restore: memory {median(mem_s) * 1e3:,.0f} ms, disk (DCP, cold cache) {median(disk_s) * 1e3:,.0f} ms "
        f"-> {median(disk_s) / median(mem_s):.1f}x faster from memory [goal >= 5x]",
    ]
    print("\n".join(lines))
    _plot(Path(args.out), median(plain), median(snapped), stall_ms, median(save_ms), median(async_ms),
          median(mem_s), median(disk_s), lines[1])
    return 0


def _plot(path: Path, plain, snapped, stall_ms, save_ms, async_ms, mem_s, disk_s, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=120)
    panels = [("step time (ms)", ["no snapshot", "snapshot\nevery step"], [plain * 1e3, snapped * 1e3]),
              ("training stall of one save (ms, log)", ["in-memory\nsnapshot", "DCP\nasync_save", "torch.save"],
               [stall_ms, async_ms, save_ms]),
              ("restore (ms)", ["memory", "disk (DCP)"], [mem_s * 1e3, disk_s * 1e3])]
    for ax, (label, names, values) in zip(axes, panels):
        ax.bar(names, values, color=["tab:green", "tab:orange", "tab:red"][:len(values)])
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.1f}", ha="center", va="bottom", fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    os.chmod(path, 0o600)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
