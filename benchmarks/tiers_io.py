"""Tier engine I/O against the plain tools, side by side in one run, printed as ratios.

    python benchmarks/tiers_io.py [--dir DIR] [--total-mib 512] [--json out.json] [--checksum-only]

0. What ``tiers.nvme.checksum`` costs: nvme tier bandwidth with ``xxh3`` (the default) and
   ``crc32`` over bandwidth with ``none``, rounds back to back.
1. nvme tier write and read bandwidth (default checksum) for 8-64 MiB tensors against fio (O_DIRECT, libaio, the
   same block size as the tier's chunk; each side at its best of the same io depths), as the
   median ratio of rounds that run fio and the tier back to back (a shared disk drifts).
   Aligned tensors are page-aligned (as host pool slots are); unaligned ones come from torch's
   allocator and go through the bounce buffers.
2. Two swap directories striped against one (on one disk they share its bandwidth: ratio ~1).
3. host tier copy against a plain ``torch`` ``copy_`` of the same bytes.
4. With CUDA: pinned host tier <-> device against a plain pinned ``copy_``.

Not run by CI: timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tierflow.offload import HostTier, HostTierConfig, NvmeTier, NvmeTierConfig, aligned_empty  # noqa: E402
from tierflow.offload.tiers._nvme_io import checksum_fn  # noqa: E402
from tierflow.offload.tiers.scheduler import TransferScheduler  # noqa: E402

MiB = 1 << 20
DEPTHS = (1, 4, 16)


def fio_bandwidth(directory: str, rw: str, bs: int, size: int, depth: int) -> float:
    """Bytes/s of one fio job: O_DIRECT, libaio, ``depth`` I/Os of ``bs`` bytes in flight.

    The file persists between jobs, so (after the first, untimed lay-out) fio overwrites written
    blocks: the same steady state the tier's write pass measures.
    """
    path = os.path.join(directory, "fio.bin")
    cmd = ["fio", "--name=tierflow", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
           "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", "--numjobs=1", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["write" if rw == "write" else "read"]["bw_bytes"])


def tier_bandwidth(dirs: List[str], tensor_bytes: int, total: int, chunk: int, depth: int, aligned: bool = True,
                   backend: str = "posix", checksum: str = "xxh3") -> Dict[str, float]:
    """Write ``total`` bytes as tensors of ``tensor_bytes`` (all in flight), then read them back.

    One untimed write pass first: swap slots are rewritten in steady state, and fio's timed jobs
    overwrite a file it laid out before, so both sides overwrite written blocks.
    """
    count = max(1, total // tensor_bytes)
    make = (lambda: aligned_empty(tensor_bytes)) if aligned else (lambda: torch.empty(tensor_bytes, dtype=torch.uint8))
    srcs = [make().fill_(i % 251) for i in range(count)]
    dsts = [make().fill_(0) for _ in range(count)]
    cfg = NvmeTierConfig(enabled=True, dirs=dirs, chunk_bytes=chunk, io_depth=depth, backend=backend,
                         checksum=checksum)
    with TransferScheduler() as sched, NvmeTier(cfg, sched) as tier:
        slots = [tier.reserve(tensor_bytes) for _ in range(count)]
        for h in [tier.write(s, t) for s, t in zip(slots, srcs)]:
            h.wait()
        start = time.perf_counter()
        for h in [tier.write(s, t) for s, t in zip(slots, srcs)]:
            h.wait()
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        for h in [tier.read(s, t) for s, t in zip(slots, dsts)]:
            h.wait()
        read_s = time.perf_counter() - start
    if not all(torch.equal(a, b) for a, b in zip(srcs, dsts)):
        raise AssertionError("nvme tier read back different bytes")
    return {"write": count * tensor_bytes / write_s, "read": count * tensor_bytes / read_s}


def versus_fio(dirs: List[str], tensor_bytes: int, total: int, chunk: int, rounds: int, aligned: bool = True,
               backend: str = "posix") -> Dict[str, float]:
    """Median over ``rounds`` of tier/fio bandwidth; in each round both run back to back, each at
    its best of the io depths :data:`DEPTHS` (fio's ``iodepth``, the tier's ``io_depth``)."""
    ratios: Dict[str, List[float]] = {"write": [], "read": []}
    tier_bw: Dict[str, List[float]] = {"write": [], "read": []}
    for i in range(rounds):
        fio: Dict[str, float] = {}
        tier: Dict[str, float] = {}

        def run_fio() -> None:
            for rw in ("write", "read"):
                fio[rw] = max(fio_bandwidth(dirs[0], rw, chunk, total, d) for d in DEPTHS)

        def run_tier() -> None:
            runs = [tier_bandwidth(dirs, tensor_bytes, total, chunk, d, aligned, backend) for d in DEPTHS]
            for rw in ("write", "read"):
                tier[rw] = max(r[rw] for r in runs)

        for step in ((run_fio, run_tier) if i % 2 == 0 else (run_tier, run_fio)):  # alternate who goes first
            step()
        for rw in ("write", "read"):
            ratios[rw].append(tier[rw] / fio[rw])
            tier_bw[rw].append(tier[rw])
    return {"write": statistics.median(tier_bw["write"]), "read": statistics.median(tier_bw["read"]),
            "write_vs_fio": statistics.median(ratios["write"]), "read_vs_fio": statistics.median(ratios["read"])}


def checksum_cost(dirs: List[str], total: int, chunk: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """Bandwidth with each ``tiers.nvme.checksum`` over bandwidth without one, 64 MiB tensors at
    io depth 4: the median of ``rounds`` back-to-back rounds (the order rotates every round)."""
    kinds = ["none", "xxh3", "crc32"]
    bw: Dict[str, Dict[str, List[float]]] = {k: {"write": [], "read": []} for k in kinds}
    for i in range(rounds):
        for k in kinds[i % 3:] + kinds[:i % 3]:
            r = tier_bandwidth(dirs, 64 * MiB, total, chunk, 4, checksum=k)
            for rw in ("write", "read"):
                bw[k][rw].append(r[rw])
    out: Dict[str, Dict[str, float]] = {}
    chunk_data = torch.randint(0, 256, (chunk,), dtype=torch.uint8)  # one chunk, as the tier hashes it
    for k in ("xxh3", "crc32"):
        digest = checksum_fn(k)
        start = time.perf_counter()
        for _ in range(64):
            digest(chunk_data)
        out[f"{k}_hash"] = {"GBps": 64 * chunk / (time.perf_counter() - start) / 1e9}
    for k in kinds:
        out[k] = {rw: statistics.median(v) for rw, v in bw[k].items()}
        if k != "none":
            for rw in ("write", "read"):
                out[k][f"{rw}_vs_none"] = statistics.median(a / b for a, b in zip(bw[k][rw], bw["none"][rw]))
    return out


def paired(plain: Callable[[], None], others: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median over ``repeats`` rounds of ``plain_time / other_time``, measured back to back.

    Interleaving makes each ratio compare two runs that saw the same load on a shared machine.
    """
    for fn in (plain, *others.values()):
        fn()  # warm-up: threads, pages, caches
    ratios: Dict[str, List[float]] = {name: [] for name in others}
    plain_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plain()
        base = time.perf_counter() - start
        plain_times.append(base)
        for name, fn in others.items():
            start = time.perf_counter()
            fn()
            ratios[name].append(base / (time.perf_counter() - start))
    out = {name: statistics.median(r) for name, r in ratios.items()}
    out["plain_s"] = statistics.median(plain_times)
    return out


def host_copy(nbytes: int, repeats: int) -> Dict[str, float]:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    plain_dst = torch.empty_like(src).fill_(0)
    out = torch.empty_like(src).fill_(0)
    with HostTier(HostTierConfig(budget_bytes=nbytes, slab_bytes=nbytes)) as host:
        slot = host.reserve(nbytes)
        r = paired(lambda: plain_dst.copy_(src), {"write_ratio": lambda: host.write(slot, src).wait(),
                                                   "read_ratio": lambda: host.read(slot, out).wait()}, repeats)
    if not torch.equal(out, src):
        raise AssertionError("host tier read back different bytes")
    return r


def cuda_copy(nbytes: int, repeats: int) -> Dict[str, float]:
    dev = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def plain_d2h() -> None:
        pinned.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()

    def plain_h2d() -> None:
        dev.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    with HostTier(HostTierConfig(budget_bytes=nbytes, slab_bytes=nbytes)) as host:
        slot = host.reserve(nbytes)
        d2h = paired(plain_d2h, {"d2h_ratio": lambda: host.write(slot, dev).wait()}, repeats)
        h2d = paired(plain_h2d, {"h2d_ratio": lambda: host.read(slot, dev).wait()}, repeats)
    return {"d2h_ratio": d2h["d2h_ratio"], "h2d_ratio": h2d["h2d_ratio"],
            "d2h_GBps": nbytes / d2h["plain_s"] / 1e9, "h2d_GBps": nbytes / h2d["plain_s"] / 1e9}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="a directory on the disk to test (default: a temp dir in /tmp)")
    parser.add_argument("--total-mib", type=int, default=512, help="bytes moved per measurement")
    parser.add_argument("--chunk-mib", type=int, default=4, help="tier chunk = fio block size")
    parser.add_argument("--sizes-mib", default="8,16,32,64", help="tensor sizes")
    parser.add_argument("--rounds", type=int, default=3, help="back-to-back tier/fio rounds per case (median)")
    parser.add_argument("--repeats", type=int, default=31, help="memory-copy rounds (median of paired ratios)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--checksum-only", action="store_true", help="only the cost of tiers.nvme.checksum")
    args = parser.parse_args(argv)
    if shutil.which("fio") is None:
        print("fio is not installed (apt-get install -y fio)", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    root = tempfile.mkdtemp(prefix="tierflow-bench-", dir=args.dir)
    dirs = [os.path.join(root, "a"), os.path.join(root, "b")]
    for d in dirs:
        os.mkdir(d)
    total, chunk = args.total_mib * MiB, args.chunk_mib * MiB
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    results: Dict[str, object] = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
                   f"cuda {'yes' if torch.cuda.is_available() else 'no'}",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    try:
        print(f"nvme: {args.total_mib} MiB per run, block = chunk = {args.chunk_mib} MiB, dir {root}")
        rounds = max(args.rounds, 5)
        cost = checksum_cost([dirs[0]], total, chunk, rounds)
        print(f"  tiers.nvme.checksum, 64 MiB tensors, io depth 4, median of {rounds} rounds "
              f"(none: write {cost['none']['write'] / 1e9:.2f} GB/s, read {cost['none']['read'] / 1e9:.2f} GB/s):")
        for k in ("xxh3", "crc32"):
            hash_bw = cost[f"{k}_hash"]["GBps"]
            print(f"    {k:<6} write {cost[k]['write_vs_none']:.2f}x   read {cost[k]['read_vs_none']:.2f}x of none;"
                  f" hashing one cached chunk {hash_bw:.1f} GB/s on one thread = {cost['none']['read'] / 1e9 / hash_bw:.0%}"
                  " of the read time, if it overlapped nothing")
        results["checksum"] = cost
        if args.checksum_only:
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return 0
        fio_bandwidth(dirs[0], "write", chunk, total, 4)  # lay fio's file out once, untimed
        print(f"  tier / fio, each at its best io depth of {DEPTHS}; median of {args.rounds} back-to-back rounds:")
        rows = []
        cases = [(size, "aligned", True, "posix") for size in sizes] + [(size, "unaligned", False, "posix") for size in sizes]
        cases.append((64 * MiB, "deepspeed_aio", True, "deepspeed_aio"))
        for size, label, aligned, backend in cases:
            try:
                r = versus_fio([dirs[0]], size, total, chunk, args.rounds, aligned, backend)
            except Exception as exc:  # the optional backend may be unavailable
                print(f"    {size // MiB:3d} MiB {label:<13} not measured: {exc}")
                continue
            rows.append({"tensor_mib": size // MiB, "kind": label, **r})
            print(f"    {size // MiB:3d} MiB {label:<13} write {r['write'] / 1e9:5.2f} GB/s = {r['write_vs_fio']:.2f}x fio"
                  f"   read {r['read'] / 1e9:5.2f} GB/s = {r['read_vs_fio']:.2f}x fio")
        ratios = {"write": [], "read": []}
        for _ in range(args.rounds):
            one = tier_bandwidth([dirs[0]], 64 * MiB, total, chunk, 4)
            two = tier_bandwidth(dirs, 64 * MiB, total, chunk, 4)
            for rw in ratios:
                ratios[rw].append(two[rw] / one[rw])
        same_disk = os.stat(dirs[0]).st_dev == os.stat(dirs[1]).st_dev
        striping = {rw: statistics.median(v) for rw, v in ratios.items()}
        print(f"  striping, 64 MiB tensors: two dirs / one dir  write {striping['write']:.2f}x   read {striping['read']:.2f}x"
              f"  (io_depth 4 per dir; {'both dirs on one disk' if same_disk else 'two disks'})")
        results["nvme"] = {"tier": rows, "striping": striping, "same_disk": same_disk}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"host tier vs torch copy_ (median of {args.repeats} back-to-back pairs)")
    host = {}
    for size in (8 * MiB, 64 * MiB):
        host[size // MiB] = r = host_copy(size, args.repeats)
        print(f"  {size // MiB:3d} MiB  copy_ {size / r['plain_s'] / 1e9:6.2f} GB/s   tier write {r['write_ratio']:.2f}x"
              f"   tier read {r['read_ratio']:.2f}x")
    results["host"] = host
    if torch.cuda.is_available():
        print("pinned host tier <-> device vs plain pinned copy_")
        results["cuda"] = cuda = {size // MiB: cuda_copy(size, args.repeats) for size in (8 * MiB, 64 * MiB)}
        for mib, r in cuda.items():
            print(f"  {mib:3d} MiB  d2h {r['d2h_ratio']:.2f}x ({r['d2h_GBps']:.1f} GB/s plain)   h2d {r['h2d_ratio']:.2f}x ({r['h2d_GBps']:.1f} GB/s plain)")
    else:
        print("no CUDA device: pinned host <-> device not measured")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
