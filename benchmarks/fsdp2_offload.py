"""FSDP2 on several ranks: tierflow's runtime on the shards against FSDP2 alone and FSDP2's ``CPUOffloadPolicy``.

Every peer trains the same built-in GPT (fp32, AdamW, synthetic tokens, the same seed and batches)
with ``fully_shard`` per block and the root, under ``torchrun`` on this machine (gloo):

* ``fsdp2``: FSDP2 alone; each rank holds its shard of every parameter, gradient and AdamW state.
* ``cpu_offload``: FSDP2 with ``CPUOffloadPolicy`` (PyTorch's own offload: sharded parameters,
  gradients and optimizer states on the host, a CPU optimizer step). On a machine without a GPU
  the host *is* the device, so it can only cost time, never save memory; it runs here because it
  is the baseline users reach for, and on a GPU machine the same command measures the real thing.
* ``tierflow``: FSDP2 plus :class:`~tierflow.offload.OffloadRuntime` with a per-rank budget in
  bytes and the NVMe tier: it profiles, plans and pages this rank's shards and activations
  (``offload.optimizer_subgroup_bytes`` sub-groups through the step, like the trainer).

Figures, per rank: the peak RSS the kernel measured (``VmHWM``, reset after the imports, so the
model build is included) and the median wall time of the steps after tierflow's profiling. The
digest of every parameter gathered at the end shows whether a peer is bit-identical to FSDP2
alone. Ratios are printed from one run, and a bar chart is written next to the results.

Usage:
    python benchmarks/fsdp2_offload.py --dir /mnt/nvme/bench --d-model 1024 --layers 8 --budget-mib 300
    python benchmarks/fsdp2_offload.py --dir /tmp/b --quick          # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

PEERS = ("fsdp2", "cpu_offload", "tierflow")
MiB = 2 ** 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(a: argparse.Namespace) -> None:
    """One rank of one peer (under torchrun): train, then write this rank's figures as JSON."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from tierflow.offload import (
        HostTierConfig,
        NvmeTierConfig,
        OffloadConfig,
        OffloadRuntime,
        SubgroupStepper,
        TiersConfig,
    )
    from tierflow.offload.integrations.fsdp2 import block_modules
    from tierflow.trainer.model import GPT, GPTConfig

    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=a.vocab, seq_len=a.seq_len, n_layer=a.layers, n_head=a.heads,
                          d_model=a.d_model))
    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if a.worker == "cpu_offload" else {}
    for block in block_modules(model):
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    runtime, step = None, optimizer.step
    if a.worker == "tierflow":
        swap = Path(a.dir) / f"swap-rank{rank}"
        swap.mkdir(parents=True, exist_ok=True)
        tiers = TiersConfig(host=HostTierConfig(enabled=False), nvme=NvmeTierConfig(enabled=True, dirs=[str(swap)]))
        runtime = OffloadRuntime(model, optimizer, OffloadConfig(policy="lifetime", device_budget_bytes=a.budget_mib * MiB),
                                 tiers=tiers)
        step = SubgroupStepper(optimizer, 64 * MiB, free_grads=True)
    gen = torch.Generator().manual_seed(1000 + rank)
    times: List[float] = []
    losses: List[float] = []
    for _ in range(a.steps):
        tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        t0 = time.perf_counter()
        with runtime.step(inputs) if runtime is not None else _nothing():
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    digest = hashlib.sha256()
    with runtime.resident() if runtime is not None else _nothing():
        for name, p in sorted(model.named_parameters()):
            digest.update(p.full_tensor().detach().contiguous().view(torch.uint8).numpy().tobytes())
    summary = runtime.summary() if runtime is not None else None
    if runtime is not None:
        runtime.close(restore=False)
    out = {"peer": a.worker, "rank": rank, "world_size": world, "peak_rss_bytes": _status("VmHWM") - baseline,
           "step_s": times, "losses": losses, "digest": digest.hexdigest(),
           "offload": {k: summary[k] for k in ("steps", "device_peak_bytes", "device_budget_bytes", "bytes_out")}
           if summary else None}
    Path(a.out, f"{a.worker}-rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def run_peer(a: argparse.Namespace, peer: str, out: Path) -> List[Dict[str, Any]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           str(Path(__file__).resolve()), "--worker", peer, "--out", str(out), *a.forwarded]
    print(f"[{peer}] {' '.join(cmd[-len(a.forwarded) - 4:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return []
    return [json.loads(Path(out, f"{peer}-rank{r}.json").read_text()) for r in range(a.nproc)]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="scratch directory (NVMe swap files, results)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget-mib", type=int, default=300, help="tierflow's budget per rank")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--quick", action="store_true", help="a tiny model, to check the benchmark runs")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.quick:
        a.d_model, a.layers, a.heads, a.steps, a.budget_mib = 128, 2, 4, 6, 8
    a.forwarded = ["--dir", a.dir, "--d-model", str(a.d_model), "--layers", str(a.layers), "--heads", str(a.heads),
                   "--vocab", str(a.vocab), "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--steps",
                   str(a.steps), "--budget-mib", str(a.budget_mib)]
    root = Path(a.dir)
    out = root / "results"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, mode=0o700)
    results = {peer: run_peer(a, peer, out) for peer in a.peers.split(",")}
    for peer in list(results):
        shutil.rmtree(root / f"swap-rank{peer}", ignore_errors=True)
    _report(a, results, out)
    return 0 if all(results.values()) else 1


def _report(a: argparse.Namespace, results: Dict[str, List[Dict[str, Any]]], out: Path) -> None:
    params = 12 * a.layers * a.d_model ** 2 + (a.vocab + a.seq_len) * a.d_model
    print(f"\nGPT d_model={a.d_model} layers={a.layers}: {params / 1e6:,.1f}M parameters, "
          f"{16 * params / MiB:,.0f} MiB of fp32 AdamW state ({16 * params / a.nproc / MiB:,.0f} MiB per rank "
          f"sharded), {a.nproc} ranks, {a.batch}x{a.seq_len} tokens per rank per step; tierflow budget "
          f"{a.budget_mib} MiB per rank")
    rows = {}
    skip = 2 if a.steps > 4 else 1  # warm-up and tierflow's profiling
    for peer, ranks in results.items():
        if not ranks:
            print(f"{peer:12s} failed")
            continue
        peak = max(r["peak_rss_bytes"] for r in ranks)
        step = statistics.median(t for r in ranks for t in r["step_s"][skip + 1:]) if a.steps > skip + 1 else \
            statistics.median(t for r in ranks for t in r["step_s"])
        rows[peer] = (peak, step, ranks[0]["digest"])
        extra = ""
        if ranks[0]["offload"]:
            o = ranks[0]["offload"]
            extra = f"  steps {o['steps']}, tracked peak {o['device_peak_bytes'] / MiB:,.0f} MiB"
        print(f"{peer:12s} peak RSS per rank {peak / MiB:8,.0f} MiB (measured)  step {step:7.3f} s{extra}")
    ref = rows.get("fsdp2")
    if ref and "tierflow" in rows:
        tf = rows["tierflow"]
        print(f"\ntierflow bit-identical to FSDP2 alone: {tf[2] == ref[2]}")
        for peer, (peak, step, _) in rows.items():
            if peer != "tierflow":
                print(f"{peer} / tierflow: peak RSS {peak / tf[0]:.2f}x, step time {step / tf[1]:.2f}x")
    (out / "summary.json").write_text(json.dumps({k: {"peak_rss_bytes": v[0], "step_s": v[1]}
                                                  for k, v in rows.items()}))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(rows)
    axes[0].bar(names, [rows[n][0] / MiB for n in names], color="#4c72b0")
    axes[0].set_ylabel("peak RSS per rank (MiB, measured)")
    axes[1].bar(names, [rows[n][1] for n in names], color="#dd8452")
    axes[1].set_ylabel("median step (s)")
    fig.suptitle(f"FSDP2 on {a.nproc} ranks, GPT d={a.d_model} x{a.layers}, tierflow budget {a.budget_mib} MiB/rank")
    fig.tight_layout()
    fig.savefig(out / "fsdp2_offload.png", dpi=120)
    print(f"plot: {out / 'fsdp2_offload.png'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
