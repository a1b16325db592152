"""FSDP2 on several ranks: tierflow's runtime on the shards against FSDP2 alone and FSDP2's ``CPUOffloadPolicy``.

Every peer trains the same built-in GPT (fp32, AdamW, synthetic tokens, the same seed and batches)
under ``torchrun`` on this machine (gloo); the first three with ``fully_shard`` per block and the root:

* ``fsdp2``: FSDP2 alone; each rank holds its shard of every parameter, gradient and AdamW state.
* ``cpu_offload``: FSDP2 with ``CPUOffloadPolicy`` (PyTorch's own offload: sharded parameters,
  gradients and optimizer states on the host, a CPU optimizer step). On a machine without a GPU
  the host *is* the device, so it can only cost time, never save memory; it runs here because it
  is the baseline users reach for, and on a GPU machine the same command measures the real thing.
* ``tierflow``: FSDP2 plus :class:`~tierflow.offload.OffloadRuntime` with a per-rank budget in
  bytes and the NVMe tier: it profiles, plans and pages this rank's shards and activations
  (``offload.optimizer_subgroup_bytes`` sub-groups through the step, like the trainer).
* ``tierflow_tiered``: FSDP2 plus :class:`~tierflow.offload.TieredOptimizer` alone: each rank's
  AdamW moments live in swap files under ``--dir`` and stream through the step in
  ``--tiered-subgroup-mib`` sub-groups; parameters, gradients and activations stay where FSDP2 puts them (no budget).
* ``deepspeed``: DeepSpeed ZeRO stage 3 instead of FSDP2 (every parameter partitioned; the model is
  built whole first, like the others, see Note [deepspeed builds whole]), parameters and AdamW states
  offloaded to the host (``--ds-offload cpu``) or to swap files under ``--dir`` (``nvme``),
  DeepSpeedCPUAdam, DeepSpeed's CPU accelerator. It runs by default when ``import deepspeed``
  works. Its own partitioning, reduction order and CPU Adam make it close to FSDP2 alone, not
  bit-identical; the report prints how close its losses are.

With ``--mp bf16`` the three FSDP2 peers shard with ``MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)`` (fp32 shards, bf16 gathers and compute, the trainer's
``trainer.precision=bf16_master`` under FSDP2); DeepSpeed is left out then.

Figures, per rank: the peak RSS the kernel measured (``VmHWM``, reset after the imports, so the
model build is included) and the median wall time of the steps after tierflow's profiling. The
digest of every parameter gathered at the end shows whether a peer is bit-identical to FSDP2
alone. Ratios against tierflow (against FSDP2 alone when tierflow does not run) are printed from
one run, and a bar chart is written next to the results.

Usage:
    python benchmarks/fsdp2_offload.py --dir /mnt/nvme/bench --d-model 1024 --layers 8 --budget-mib 300
    python benchmarks/fsdp2_offload.py --dir /tmp/b --quick          # seconds
    python benchmarks/fsdp2_offload.py --dir /tmp/b --quick --peers fsdp2,deepspeed --ds-offload nvme
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from _deepspeed import deepspeed_import_error, failure_reason

PEERS = ("fsdp2", "cpu_offload", "tierflow", "tierflow_tiered", "deepspeed")
MiB = 2 ** 20
PROFILE_FROM = 3  # the first step after tierflow's warm-up and two profiled steps
DS_SWAP = "deepspeed-nvme"  # under --dir; DeepSpeed makes a folder per rank inside


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model(a: argparse.Namespace) -> Any:
    import torch

    from tierflow.trainer.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=a.vocab, seq_len=a.seq_len, n_layer=a.layers, n_head=a.heads, d_model=a.d_model))


def _batches(a: argparse.Namespace, rank: int) -> Iterator[Tuple[Any, Any]]:
    """This rank's (inputs, targets) for every step; each peer sees the same ones."""
    import torch

    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(a.steps):
        tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=gen)
        yield tokens[:, :-1], tokens[:, 1:]


def _hash(digest: Any, tensor: Any) -> None:
    import torch

    digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())


def _write(a: argparse.Namespace, rank: int, world: int, baseline: int, times: List[float], losses: List[float],
           digest: Any, offload: Optional[Dict[str, Any]], swap_bytes: int = 0) -> None:
    out = {"peer": a.worker, "rank": rank, "world_size": world, "peak_rss_bytes": _status("VmHWM") - baseline,
           "step_s": times, "losses": losses, "digest": digest.hexdigest(), "offload": offload,
           "swap_bytes": swap_bytes}
    Path(a.out, f"{a.label or a.worker}-rank{rank}.json").write_text(json.dumps(out))


def worker(a: argparse.Namespace) -> None:
    """One rank of one FSDP2 peer (under torchrun): train, then write this rank's figures as JSON."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from tierflow.offload import (
        HostTierConfig,
        NvmeTierConfig,
        OffloadConfig,
        OffloadRuntime,
        SubgroupStepper,
        TieredOptimizer,
        TieredOptimizerConfig,
        TiersConfig,
    )
    from tierflow.offload.integrations.fsdp2 import block_modules
    from tierflow.offload.tiers import map_large_allocations
    from tierflow.trainer.model import GPT  # noqa: F401 (for _model, imported before the baseline)

    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(a)
    policy: Dict[str, Any] = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if a.worker == "cpu_offload" else {}
    if a.mp == "bf16":
        policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in block_modules(model):
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    runtime, step = None, optimizer.step
    # The allocator rule: --mmap-mib for every peer, else tierflow_tiered's as the trainer sets it on
    # CPU (Note [the build maps its tensors]) and glibc's own for the others. The runtime sets its own.
    mmap_mib = a.mmap_mib if a.mmap_mib is not None else int(a.worker == "tierflow_tiered")
    if mmap_mib:
        map_large_allocations(mmap_mib * MiB)
    swap = Path(a.dir) / f"swap-rank{rank}"
    tiers = TiersConfig(host=HostTierConfig(enabled=False), nvme=NvmeTierConfig(enabled=True, dirs=[str(swap)]))
    if a.worker == "tierflow_tiered":
        swap.mkdir(parents=True, exist_ok=True)
        # num_buffers staging buffers of one sub-group's moments each: small sub-groups keep that low.
        optimizer = TieredOptimizer(optimizer, tiers=tiers, config=TieredOptimizerConfig(
            paths=["nvme"], subgroup_bytes=a.tiered_subgroup_mib * MiB, overlap_backward=a.tiered_overlap,
            resident_bytes=a.tiered_resident_mib * MiB))
        step = optimizer.step
    if a.worker == "tierflow":
        swap.mkdir(parents=True, exist_ok=True)
        runtime = OffloadRuntime(model, optimizer, OffloadConfig(policy="lifetime", device_budget_bytes=int(a.budget_mib) * MiB),
                                 tiers=tiers)
        step = SubgroupStepper(optimizer, 64 * MiB, free_grads=True)
    times: List[float] = []
    losses: List[float] = []
    profiler = cProfile.Profile() if a.profile and rank == 0 else None
    for i, (inputs, targets) in enumerate(_batches(a, rank)):
        if profiler is not None and i == PROFILE_FROM:
            profiler.enable()  # the steps after tierflow's warm-up and profiling
        t0 = time.perf_counter()
        with runtime.step(inputs) if runtime is not None else _nothing():
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(Path(a.out) / f"{a.label}-rank0.prof")  # for pstats: other sort orders
        with open(Path(a.out) / f"{a.label}-rank0-profile.txt", "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(60)
    digest = hashlib.sha256()
    with runtime.resident() if runtime is not None else _nothing():
        for name, p in sorted(model.named_parameters()):
            _hash(digest, p.full_tensor())
    summary = runtime.summary() if runtime is not None else None
    if runtime is not None:
        runtime.close(restore=False)
    if isinstance(optimizer, TieredOptimizer):
        optimizer.close()
    _write(a, rank, world, baseline, times, losses, digest,
           {k: summary[k] for k in ("steps", "device_peak_bytes", "device_budget_bytes", "bytes_out")}
           if summary else None)
    dist.destroy_process_group()


def deepspeed_worker(a: argparse.Namespace) -> None:
    """One rank of the ``deepspeed`` peer (under torchrun): ZeRO-3 offloading to ``--ds-offload``, then JSON."""
    from _deepspeed import use_cpu_accelerator, zero3_config

    use_cpu_accelerator()
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F

    from tierflow.trainer.model import GPT  # noqa: F401 (for _model, imported before the baseline)

    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # Swapped in, a parameter's shard must fit one page-locked buffer: size them to the largest
    # parameter (the default, 5 buffers of 100M elements, locks 2 GB per rank whatever the model).
    largest = a.d_model * max(4 * a.d_model, a.vocab, a.seq_len)
    config = zero3_config(a.batch, a.ds_offload, str(Path(a.dir) / DS_SWAP), lr=1e-4, weight_decay=0.01,
                          settings={"buffer_size": largest})  # torch.optim.AdamW's weight decay, as the others
    # Note [deepspeed builds whole]: built whole, as the FSDP2 peers build it, then partitioned. Under
    # `with zero.Init()` each block is partitioned as it is built, so GPT's rescaling of the residual
    # projections that follows in its __init__ writes into empty tensors and is lost (checked by
    # gathering: std 0.02 instead of 0.02 / sqrt(2 * layers)): the peer would train another model.
    # Partitioned here, not by initialize: given a whole module, initialize passes Init its dtype,
    # which `Init._set_dtype` (DeepSpeed 0.19) overrides with bfloat16 on an accelerator without
    # fp16, so the NVMe swapper's buffers are bf16 and the first forward fails ("float !=
    # BFloat16"); Init with the config and no dtype takes fp32 from the config.
    model = _model(a)
    deepspeed.zero.Init(module=model, config_dict_or_path=config, remote_device=a.ds_offload)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    times: List[float] = []
    losses: List[float] = []
    for inputs, targets in _batches(a, rank):
        t0 = time.perf_counter()
        loss = F.cross_entropy(engine(inputs).flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    # DeepSpeed's swap files for this rank (parameters, optimizer states) live in folders named rank<N>.
    swap_bytes = sum(f.stat().st_size for f in Path(a.dir, DS_SWAP).rglob("*")
                     if f.is_file() and f"rank{rank}" in f.relative_to(a.dir).parts)
    digest = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        with deepspeed.zero.GatheredParameters([p]):  # one at a time, as FSDP2's full_tensor above
            _hash(digest, p)
    _write(a, rank, world, baseline, times, losses, digest, None, swap_bytes)
    dist.destroy_process_group()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def run_peer(a: argparse.Namespace, label: str, out: Path) -> Tuple[List[Dict[str, Any]], str]:
    """Every rank's figures, or no figures and why the peer failed (``tierflow@300``: tierflow at 300 MiB)."""
    peer, _, budget = label.partition("@")
    forwarded = a.forwarded + ["--budget-mib", budget or a.budgets[0], "--label", label]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           str(Path(__file__).resolve()), "--worker", peer, "--out", str(out), *forwarded]
    print(f"[{label}] {' '.join(cmd[-len(forwarded) - 4:])}", flush=True)
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if a.thp == "on" else "0"}  # the same for every peer
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return [], failure_reason(done.stderr) or f"torchrun exited with {done.returncode}"
    return [json.loads(Path(out, f"{label}-rank{r}.json").read_text()) for r in range(a.nproc)], ""


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
    p.add_argument("--budget-mib", default="300", help="tierflow's budget per rank; several (200,800) run tierflow "
                                                      "once per budget, reported as tierflow@200, tierflow@800")
    p.add_argument("--peers", default=None, help=f"comma-separated, of {','.join(PEERS)} (default: all; "
                                                   "deepspeed only where `import deepspeed` works)")
    p.add_argument("--ds-offload", choices=("cpu", "nvme"), default="cpu",
                   help=f"where the deepspeed peer keeps parameters and AdamW states (nvme: --dir/{DS_SWAP})")
    p.add_argument("--mp", choices=("none", "bf16"), default="none",
                   help="bf16: the FSDP2 peers gather and compute in bf16 over fp32 shards (MixedPrecisionPolicy)")
    p.add_argument("--tiered-resident-mib", type=int, default=0,
                   help="tierflow_tiered keeps this much of each rank's state in memory, updated in place (no I/O)")
    p.add_argument("--tiered-overlap", action="store_true",
                   help="tierflow_tiered updates sub-groups during backward (overlap_backward)")
    p.add_argument("--tiered-subgroup-mib", type=int, default=16,
                   help="tierflow_tiered: parameter MiB per sub-group (3 staging buffers hold 2x this in moments)")
    p.add_argument("--mmap-mib", type=int, default=None,
                   help="every FSDP2 peer has glibc map allocations of this many MiB or more on their own (0: "
                        "glibc's own rule for all); default: each as it runs by itself (tierflow_tiered at 1 MiB "
                        "as the trainer does on CPU, the peers without tierflow under glibc's rule)")
    p.add_argument("--quick", action="store_true", help="a tiny model, to check the benchmark runs")
    p.add_argument("--thp", choices=("on", "off"), default="on",
                   help="THP_MEM_ALLOC_ENABLE for every peer (Note [huge pages for CPU tensors]; tierflow's default)")
    p.add_argument("--profile", action="store_true", help=f"cProfile rank 0 from step {PROFILE_FROM} on: "
                                                          "results/<peer>-rank0-profile.txt (and .prof) under --dir")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--label", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        if a.worker == "deepspeed":
            deepspeed_worker(a)
        else:
            worker(a)
        from tierflow.trainer.distributed import end_process

        end_process(0, held_group=True)  # Note [a finished rank exits without destructors]
    if a.quick:
        a.d_model, a.layers, a.heads, a.steps, a.budget_mib = 128, 2, 4, 6, "8"
    a.budgets = [b.strip() for b in a.budget_mib.split(",") if b.strip()]
    if not a.budgets or not all(b.isdigit() for b in a.budgets):
        p.error(f"--budget-mib takes whole MiB, comma-separated: not {a.budget_mib!r}")
    a.forwarded = ["--dir", a.dir, "--d-model", str(a.d_model), "--layers", str(a.layers), "--heads", str(a.heads),
                   "--vocab", str(a.vocab), "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--steps",
                   str(a.steps), "--ds-offload", a.ds_offload, "--mp", a.mp,
                   "--tiered-subgroup-mib", str(a.tiered_subgroup_mib), "--tiered-resident-mib",
                   str(a.tiered_resident_mib)] + (["--mmap-mib", str(a.mmap_mib)] if a.mmap_mib is not None else []) + \
        (["--tiered-overlap"] if a.tiered_overlap else []) + (["--profile"] if a.profile else [])
    peers = a.peers.split(",") if a.peers else _default_peers()
    if a.mp != "none" and "deepspeed" in peers:
        if a.peers:
            p.error("--mp applies to the FSDP2 peers; leave deepspeed out of --peers")
        peers.remove("deepspeed")
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        p.error(f"unknown peers {unknown}; choose from {','.join(PEERS)}")
    root = Path(a.dir)
    out = root / "results"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, mode=0o700)
    labels = [label for peer in peers for label in
              ([f"tierflow@{b}" for b in a.budgets] if peer == "tierflow" and len(a.budgets) > 1 else [peer])]
    results, errors = {}, {}
    for label in labels:
        results[label], errors[label] = run_peer(a, label, out)
    for swap in [f"swap-rank{r}" for r in range(a.nproc)] + [DS_SWAP]:
        shutil.rmtree(root / swap, ignore_errors=True)
    _report(a, results, errors, out)
    return 0 if all(results.values()) else 1


def _default_peers() -> List[str]:
    reason = deepspeed_import_error()
    if reason is None:
        return list(PEERS)
    print(f"[deepspeed] skipped: `import deepspeed` failed: {reason}", flush=True)
    return [peer for peer in PEERS if peer != "deepspeed"]


def _report(a: argparse.Namespace, results: Dict[str, List[Dict[str, Any]]], errors: Dict[str, str],
            out: Path) -> None:
    params = 12 * a.layers * a.d_model ** 2 + (a.vocab + a.seq_len) * a.d_model
    ds = f"; deepspeed offloads to {a.ds_offload}" if "deepspeed" in results else ""
    mp = "; bf16 gathers and compute (MixedPrecisionPolicy)" if a.mp == "bf16" else ""
    print(f"\nGPT d_model={a.d_model} layers={a.layers}: {params / 1e6:,.1f}M parameters, "
          f"{16 * params / MiB:,.0f} MiB of fp32 AdamW state ({16 * params / a.nproc / MiB:,.0f} MiB per rank "
          f"sharded), {a.nproc} ranks, {a.batch}x{a.seq_len} tokens per rank per step; tierflow budget "
          f"{', '.join(a.budgets)} MiB per rank" + ds + mp + f"; THP_MEM_ALLOC_ENABLE={int(a.thp == 'on')} for every peer")
    rows = {}
    skip = 2 if a.steps > 4 else 1  # warm-up and tierflow's profiling
    for peer, ranks in results.items():
        if not ranks:
            print(f"{peer:15s} failed: {errors[peer]}")
            continue
        peak = max(r["peak_rss_bytes"] for r in ranks)
        step = statistics.median(t for r in ranks for t in r["step_s"][skip + 1:]) if a.steps > skip + 1 else \
            statistics.median(t for r in ranks for t in r["step_s"])
        rows[peer] = (peak, step, ranks[0]["digest"], ranks[0]["losses"])
        extra = ""
        if ranks[0]["offload"]:
            o = ranks[0]["offload"]
            extra = f"  steps {o['steps']}, tracked peak {o['device_peak_bytes'] / MiB:,.0f} MiB"
        if peer == "deepspeed" and a.ds_offload == "nvme":
            swapped = max(r["swap_bytes"] for r in ranks)
            extra = f"  swap files {swapped / MiB:,.1f} MiB per rank" + ("" if swapped else
                    " (nothing swapped: DeepSpeed keeps tensors under its 1 MiB aio minimum in memory)")
        print(f"{peer:15s} peak RSS per rank {peak / MiB:8,.0f} MiB (measured)  step {step:7.3f} s{extra}")
    print()
    fsdp2 = rows.get("fsdp2")
    for peer, (_, _, digest, losses) in rows.items():
        if fsdp2 and peer != "fsdp2":
            same = digest == fsdp2[2]
            gap = max(abs(x - y) / abs(y) for x, y in zip(losses, fsdp2[3]))
            print(f"{peer} bit-identical to FSDP2 alone: {same}" +
                  ("" if same else f" (rank 0's losses differ from FSDP2's by at most {gap:.1e}, relative)"))
    bases = [peer for peer in rows if peer.startswith("tierflow")] or ["fsdp2"]
    for base in bases:
        for peer, (peak, step, _, _) in rows.items():
            if base in rows and peer not in bases:
                print(f"{peer} / {base}: peak RSS {peak / rows[base][0]:.2f}x, step time {step / rows[base][1]:.2f}x")
    (out / "summary.json").write_text(json.dumps({k: {"peak_rss_bytes": v[0], "step_s": v[1]}
                                                  for k, v in rows.items()}))
    if not rows:
        return
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
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=25)
    fig.suptitle(f"FSDP2 on {a.nproc} ranks, GPT d={a.d_model} x{a.layers}, tierflow budget {a.budget_mib} MiB/rank")
    fig.tight_layout()
    fig.savefig(out / "fsdp2_offload.png", dpi=120)
    print(f"plot: {out / 'fsdp2_offload.png'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
