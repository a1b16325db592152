"""Tiered optimizer vs DeepSpeed ZeRO offload on this machine, side by side, one process per configuration.

Configurations (each runs alone in its own subprocess, so its peak RSS is its own VmHWM):

* ``tierflow-nvme``: the built-in GPT, fp32, AdamW (fused CPU kernel) wrapped in TieredOptimizer
  with its state on NVMe (``--nvme-dir``).
* ``deepspeed-nvme``: DeepSpeed ZeRO-3 with ``offload_optimizer=nvme`` and ``offload_param=nvme`` on
  DeepSpeed's CPU accelerator with gloo (``DS_ACCELERATOR=cpu``), DeepSpeedCPUAdam.
* ``tierflow-nvme-overlap``: the same with ``overlap_backward`` (updates start during backward).
* ``tierflow-host`` vs ``deepspeed-cpu``: state in the host tier vs ZeRO-2 ``offload_optimizer=cpu``.
* ``update``: CPU update throughput on the same state: fused torch AdamW, DeepSpeedCPUAdam, and the
  TieredOptimizer with that state in the host tier (torch kernel, and ``cpu_kernel=deepspeed``);
  warm-up, then ``--repeats`` round-robin rounds; min and median.

Same model, batch, precision (fp32) and learning rate everywhere. Prints ratios, writes
``docs/img/optimizer.png`` and a JSON of every number.

Usage:
    python benchmarks/optimizer.py --nvme-dir /tmp/tfbench            # the recorded run (>= 4 GiB of Adam state)
    python benchmarks/optimizer.py --quick --nvme-dir /tmp/tfbench    # a small model, a minute or two
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
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GiB = 1 << 30
MiB = 1 << 20
SIZES = {  # fp32 AdamW state = 8 bytes per parameter
    "full": dict(n_layer=11, d_model=2048, n_head=16),  # 554M parameters: 4.13 GiB of Adam state
    "quick": dict(n_layer=4, d_model=768, n_head=12),  # 28M parameters
}
VOCAB, SEQ, BATCH, LR = 256, 64, 2, 1e-4


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _model(size: str):
    import torch

    from tierflow.trainer.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, **SIZES[size]))


def _batches(steps: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen) for _ in range(steps)]


def worker_tierflow(args: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from tierflow.offload import HostTierConfig, NvmeTierConfig, TieredOptimizer, TieredOptimizerConfig, TiersConfig
    from tierflow.trainer.metrics import progress_bar

    model = _model(args["size"])
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = 8 * n_params
    if args["path"] == "nvme":
        tiers = TiersConfig(nvme=NvmeTierConfig(enabled=True, dirs=[args["dir"]], chunk_bytes=8 * MiB, io_depth=4,
                                                budget_bytes=3 * state_bytes))
    else:
        tiers = TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=3 * state_bytes, slab_bytes=256 * MiB))
    cfg = TieredOptimizerConfig(paths=[args["path"]], subgroup_bytes=args["subgroup_bytes"],
                                atomic_step=args["atomic"], overlap_backward=args.get("overlap", False))
    opt = TieredOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, fused=True), config=cfg, tiers=tiers)
    times, opt_times = [], []
    bar = progress_bar(args["steps"], args["name"])
    for batch in _batches(args["steps"]):
        t0 = time.perf_counter()
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        opt_times.append(time.perf_counter() - t1)
        bar.update(1)
    bar.close()
    opt.close()
    peak = _peak_rss_bytes()
    digest = hashlib.sha256()
    for p in model.parameters():  # hashed in place: no copy, so the peak above is not disturbed
        digest.update(memoryview(p.detach().numpy()).cast("B"))
    return {"params": n_params, "step_s": times, "optimizer_s": opt_times, "peak_rss": peak,
            "counters": opt.counters, "digest": digest.hexdigest()}


def worker_deepspeed(args: Dict[str, Any]) -> Dict[str, Any]:
    import deepspeed
    import torch.nn.functional as F

    from tierflow.trainer.metrics import progress_bar

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    zero: Dict[str, Any] = {"stage": args["stage"], "sub_group_size": args["subgroup_bytes"] // 4}
    if args["path"] == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": args["dir"], "pin_memory": False}
        zero["offload_param"] = {"device": "nvme", "nvme_path": args["dir"], "pin_memory": False}
    else:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
              "zero_optimization": zero, "steps_per_print": 10 ** 9,
              "aio": {"block_size": 8 * MiB, "queue_depth": 8, "single_submit": False, "overlap_events": True}}
    if args["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = _model(args["size"])
    else:
        model = _model(args["size"])
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    times, opt_times = [], []
    bar = progress_bar(args["steps"], args["name"])
    for batch in _batches(args["steps"]):
        t0 = time.perf_counter()
        logits = engine(batch[:, :-1])
        engine.backward(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
        t1 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        opt_times.append(time.perf_counter() - t1)
        bar.update(1)
    bar.close()
    return {"params": n_params, "step_s": times, "optimizer_s": opt_times, "peak_rss": _peak_rss_bytes()}


def worker_update(args: Dict[str, Any]) -> Dict[str, Any]:
    """Seconds per AdamW update of the same ``numel`` fp32 state, every kernel in one process.

    Each kernel gets its own copy of the same parameters, gradients and state. After a warm-up
    update (state created, pages touched) the kernels are timed round-robin, the starting kernel
    rotating every round, so machine load drifts over all of them alike; min and median are reported.
    """
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from tierflow.offload import HostTierConfig, TieredOptimizer, TieredOptimizerConfig, TiersConfig

    numel, num_params = args["numel"], 8
    chunk = numel // num_params
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(chunk, generator=gen) for _ in range(num_params)]
    grads = [torch.randn(chunk, generator=gen) for _ in range(num_params)]

    def params() -> List[torch.nn.Parameter]:
        out = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(out, grads):
            p.grad = g.clone()
        return out

    def tiered(kernel: str):
        tiers = TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=2 * 8 * numel, slab_bytes=256 * MiB))
        cfg = TieredOptimizerConfig(paths=["host"], subgroup_bytes=4 * chunk, cpu_kernel=kernel)
        return TieredOptimizer(torch.optim.AdamW(params(), lr=LR, fused=True), tiers=tiers, config=cfg)

    makers = {
        "torch_fused": lambda: torch.optim.AdamW(params(), lr=LR, fused=True),
        "deepspeed_cpu_adam": lambda: DeepSpeedCPUAdam(params(), lr=LR, adamw_mode=True),
        "tierflow_host": lambda: tiered("torch"),
        "tierflow_host_deepspeed": lambda: tiered("deepspeed"),
    }
    opts = {name: make() for name, make in makers.items()}
    for opt in opts.values():
        opt.step()  # warm-up: creates the state (and moves it into the host tier)
    out: Dict[str, List[float]] = {name: [] for name in opts}
    names = list(opts)
    for r in range(args["repeats"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            opts[name].step()
            out[name].append(time.perf_counter() - t0)
    for opt in opts.values():
        if hasattr(opt, "close"):
            opt.close()
    return {"numel": numel, "seconds": out}


def _run_worker(kind: str, args: Dict[str, Any], ds: bool) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(os.cpu_count()))
    if ds:
        env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1",
                   LOCAL_RANK="0", LOCAL_SIZE="1")
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, __file__, "--worker", kind, "--args", json.dumps(args), "--out", out]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if not args.get("verbose") else None,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 28M-parameter GPT instead of 554M")
    ap.add_argument("--nvme-dir", default="/tmp/tierflow-bench", help="swap directory on the local disk")
    ap.add_argument("--steps", type=int, default=4, help="steps per configuration (the first is warm-up)")
    ap.add_argument("--subgroup-mib", type=int, default=256, help="sub-group size (parameter MiB) of both systems")
    ap.add_argument("--only", default="", help="comma-separated configurations to run")
    ap.add_argument("--repeats", type=int, default=15, help="timed updates per kernel in the update benchmark")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "optimizer.json"))
    ap.add_argument("--plot", default=str(REPO / "docs" / "img" / "optimizer.png"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        fn = {"tierflow": worker_tierflow, "deepspeed": worker_deepspeed, "update": worker_update}[a.worker]
        result = fn(json.loads(a.args))
        with open(a.out, "w") as f:
            json.dump(result, f)
        return 0

    size = "quick" if a.quick else "full"
    common = dict(size=size, steps=a.steps, subgroup_bytes=a.subgroup_mib * MiB)
    configs = {
        "tierflow-nvme": ("tierflow", dict(common, path="nvme", atomic=True), False),
        "deepspeed-nvme": ("deepspeed", dict(common, path="nvme", stage=3), True),
        "tierflow-nvme-overlap": ("tierflow", dict(common, path="nvme", atomic=True, overlap=True), False),
        "tierflow-host": ("tierflow", dict(common, path="host", atomic=True), False),
        "deepspeed-cpu": ("deepspeed", dict(common, path="cpu", stage=2), True),
        "update": ("update", dict(numel=(8 if a.quick else 64) * MiB, repeats=a.repeats), True),
    }
    chosen = [c for c in (a.only.split(",") if a.only else configs)]
    results: Dict[str, Any] = {}
    for name in chosen:
        kind, args, ds = configs[name]
        path = Path(a.nvme_dir) / name
        if "nvme" in name:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True, mode=0o700)
        t0 = time.perf_counter()
        results[name] = _run_worker(kind, dict(args, name=name, dir=str(path)), ds)
        shutil.rmtree(path, ignore_errors=True)
        print(f"{name}: {_describe(results[name])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    report = _ratios(results)
    print("\n".join(report))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"size": size, "model": SIZES[size], "batch": [BATCH, SEQ], "results": results,
                                        "ratios": report}, indent=1))
    _plot(results, Path(a.plot), size)
    return 0


def _median_step(r: Dict[str, Any]) -> float:
    return statistics.median(r["step_s"][1:] or r["step_s"])


def _describe(r: Dict[str, Any]) -> str:
    if "error" in r:
        return r["error"]
    if "seconds" in r:
        return ", ".join(f"{k} {min(v) * 1e3:.1f}/{statistics.median(v) * 1e3:.1f} ms (min/median)"
                         for k, v in r["seconds"].items())
    return (f"{r['params'] / 1e6:.0f}M params, median step {_median_step(r):.2f} s (optimizer "
            f"{statistics.median(r['optimizer_s'][1:] or r['optimizer_s']):.2f} s), "
            f"peak RSS {r['peak_rss'] / GiB:.2f} GiB")


def _ratios(results: Dict[str, Any]) -> List[str]:
    lines = []
    for ours, theirs in (("tierflow-nvme", "deepspeed-nvme"), ("tierflow-nvme-overlap", "deepspeed-nvme"),
                         ("tierflow-host", "deepspeed-cpu")):
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "step_s" in a and "step_s" in b:
            lines.append(f"{ours} vs {theirs}: {_median_step(b) / _median_step(a):.2f}x faster per iteration, "
                         f"peak RSS {a['peak_rss'] / GiB:.2f} vs {b['peak_rss'] / GiB:.2f} GiB "
                         f"({a['peak_rss'] / b['peak_rss']:.2f}x)")
    u = results.get("update", {}).get("seconds")
    if u:
        for stat, fn in (("min", min), ("median", statistics.median)):
            base = {k: fn(u[k]) for k in ("torch_fused", "deepspeed_cpu_adam")}
            best = min(base.values())
            ours = ", ".join(f"{k} {fn(v) * 1e3:.1f} ms = {best / fn(v):.2f}x"
                             for k, v in u.items() if k.startswith("tierflow"))
            lines.append(f"CPU update ({stat} of {len(u['torch_fused'])}): fused torch AdamW "
                         f"{base['torch_fused'] * 1e3:.1f} ms, DeepSpeedCPUAdam {base['deepspeed_cpu_adam'] * 1e3:.1f} ms; "
                         f"{ours} of the faster")
    digests = {n: r["digest"] for n, r in results.items() if "digest" in r}
    if len(digests) > 1:
        same = len(set(digests.values())) == 1
        lines.append(f"parameters after the run: {'bit-identical' if same else 'DIFFERENT'} across {', '.join(digests)}")
    return lines


def _plot(results: Dict[str, Any], path: Path, size: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("tierflow-nvme", "tierflow-nvme-overlap", "deepspeed-nvme", "tierflow-host", "deepspeed-cpu")
             if "step_s" in results.get(n, {})]
    if not names:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["tab:blue" if n.startswith("tierflow") else "tab:gray" for n in names]
    ax1.bar(names, [_median_step(results[n]) for n in names], color=colors)
    ax1.set_ylabel("median iteration time (s)")
    ax2.bar(names, [results[n]["peak_rss"] / GiB for n in names], color=colors)
    ax2.set_ylabel("peak RSS (GiB)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    params = results[names[0]]["params"] / 1e6
    fig.suptitle(f"GPT {params:.0f}M params, fp32 AdamW, batch {BATCH}x{SEQ}, 2 vCPU ({size})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
