"""Training a state larger than memory: tierflow against DeepSpeed ZeRO-Infinity and the disk's limit.

Every configuration trains the built-in GPT (fp32, AdamW, synthetic tokens) in its own
subprocess; the figures are the peak RSS the kernel measured (``VmHWM``, reset after the imports)
and the wall time of each step. In the same run, ``fio`` measures the disk's sequential write and
read bandwidth in the same directory (O_DIRECT, 4 MiB blocks), so each planned step's I/O time
at that bandwidth (bytes moved / bandwidth) sits next to its measured time and next to the compute
the tracer measured for the step (the physical limit is max(compute, I/O)).

* ``tierflow``: ``tierflow train`` with ``offload.device_budget_bytes`` and the NVMe tier: the
  trainer builds the model straight into NVMe and every step keeps the budget.
* ``deepspeed``: ZeRO stage 3 with ``zero.Init(remote_device="nvme")``, parameters and optimizer
  states offloaded to NVMe, CPU accelerator, gloo (DeepSpeed's async I/O needs ``libaio-dev``; its
  ``cpu_adam`` and ``async_io`` ops are built on first use). Its buffer settings are arguments.

Usage:
    python benchmarks/train_out_of_core.py --dir /mnt/nvme/bench --d-model 1024 --layers 8 --steps 4
    python benchmarks/train_out_of_core.py --dir /mnt/nvme/bench --d-model 4096 --layers 20 --steps 4 \\
        --budget-gib 3 --peers tierflow               # the largest model (4.0B parameters, 64 GB of state)
    python benchmarks/train_out_of_core.py --dir /tmp/b --quick                  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from _deepspeed import ZERO3_DEFAULTS
from torch import nn

from tierflow.trainer.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


class UntiedGPT(GPT):
    """The built-in GPT with its own output head (not tied to the token embedding).

    DeepSpeed's NVMe parameter swapper fails on the tied one (``AssertionError: param 17 already
    assigned swap buffer id 1`` at the first forward), so both peers train this one. The trainer
    builds it from ``model._target_=train_out_of_core.UntiedGPT`` with the size keys.
    """

    def __init__(self, vocab_size: int, seq_len: int, n_layer: int, n_head: int, d_model: int,
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=n_layer, n_head=n_head,
                                   d_model=d_model, mlp_ratio=mlp_ratio, dropout=dropout))
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
GiB, MiB = 1 << 30, 1 << 20

_STATUS = r"""
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
"""

_TIERFLOW = _STATUS + r"""
import json, sys
import torch
from tierflow.trainer.train import main
baseline = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
code = main(sys.argv[1:])
print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": status("VmHWM"), "exit": code}))
sys.exit(code)
"""

_DEEPSPEED = _STATUS + r"""
import json, os, sys, time
from _deepspeed import use_cpu_accelerator, zero3_config
use_cpu_accelerator()
for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
             ("MASTER_PORT", "29533")):
    os.environ.setdefault(k, v)
import torch, torch.nn.functional as F
import deepspeed
from train_out_of_core import UntiedGPT
args = json.loads(sys.argv[1])
baseline = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
deepspeed.init_distributed(dist_backend="gloo")
config = zero3_config(args["batch"], "nvme", args["dir"], lr=3e-4, weight_decay=0.1, clip=args["clip"],
                      settings=args["ds"])
t0 = time.perf_counter()
with deepspeed.zero.Init(remote_device="nvme", config_dict_or_path=config):
    torch.manual_seed(0)
    model = UntiedGPT(args["vocab"], args["seq"], args["layers"], args["heads"], args["d_model"])
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
build_s = time.perf_counter() - t0
g = torch.Generator().manual_seed(1)
times, losses = [], []
for _ in range(args["steps"]):
    t = time.perf_counter()
    tokens = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=g)
    loss = F.cross_entropy(engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
    times.append(time.perf_counter() - t)
print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": status("VmHWM"), "step_s": times,
                  "losses": losses, "build_s": build_s}))
"""


def fio(directory: Path, size_gib: float) -> Dict[str, float]:
    """Sequential O_DIRECT write then read bandwidth (bytes/s) of ``directory``'s disk."""
    if shutil.which("fio") is None:
        return {}
    out = {}
    for rw in ("write", "read"):
        done = subprocess.run(["fio", "--name=seq", f"--directory={directory}", f"--rw={rw}", "--bs=4M",
                               f"--size={int(size_gib * 1024)}M", "--direct=1", "--ioengine=psync", "--numjobs=4",
                               "--group_reporting", "--output-format=json", "--unlink=0"],
                              capture_output=True, text=True, check=True)
        job = json.loads(done.stdout)["jobs"][0][rw]
        out[rw] = job["bw_bytes"]
    for f in directory.glob("seq.*"):
        f.unlink()
    return out


def run_tierflow(a: argparse.Namespace, directory: Path) -> Dict[str, Any]:
    run_root = directory / "runs"
    nvme = directory / "tierflow-nvme"
    nvme.mkdir(parents=True, exist_ok=True)
    overrides = ["logging=none", "logging.progress=false", "logging.plot=false", f"logging.run_root={run_root}",
                 "model._target_=train_out_of_core.UntiedGPT",
                 f"model.n_layer={a.layers}", f"model.d_model={a.d_model}", f"model.n_head={a.heads}",
                 f"data.vocab_size={a.vocab}", f"data.seq_len={a.seq}", f"trainer.global_batch={a.batch}",
                 f"trainer.steps={a.steps}", "trainer.eval_every=0", "trainer.eval_batches=1", f"trainer.grad_clip={a.clip}",
                 "offload=lifetime", f"offload.device_budget_bytes={int(a.budget_gib * GiB)}",
                 f"offload.profile_warmup={a.warmup}", "offload.profile_iterations=1",
                 "tiers.host.enabled=false", "tiers.nvme.enabled=true", f"tiers.nvme.dirs=[{nvme}]"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _TIERFLOW, *overrides], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}",
                "wall_s": wall}
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    (run_dir,) = [d for d in run_root.iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    o = summary["offload"]
    n_planned = o["steps"].get("planned", 0)
    planned = metrics[len(metrics) - n_planned:] if n_planned else []
    moved = [sum(v for k, v in m.items() if k.startswith("offload/bytes_")) for m in planned]
    compute = _traced_compute_s(run_dir / "trace.tftrace")
    shutil.rmtree(run_root, ignore_errors=True)
    return {"parameters": summary["parameters"], "peak_rss_bytes": rss["peak_rss_bytes"],
            "rss_growth_bytes": rss["peak_rss_bytes"] - rss["baseline_rss_bytes"],
            "step_s": [m["step_time_s"] for m in metrics], "planned_step_s": [m["step_time_s"] for m in planned],
            "planned_bytes_moved": moved, "compute_s": compute, "losses": [m["loss"] for m in metrics],
            "device_peak_bytes": o["device_peak_bytes"], "peak_by_mode": o["peak_by_mode"], "wall_s": wall,
            "digest": summary["param_digests"][0]}


def _traced_compute_s(path: Path) -> Optional[float]:
    """The compute the tracer measured for one iteration (stalls for copies excluded)."""
    try:
        from tierflow.profiling import load_trace

        trace = load_trace(path)
    except Exception:  # the trace is optional: a figure goes missing, the benchmark goes on
        return None
    bounds = trace.iteration_bounds()
    s, e = bounds[-1]
    return sum(p.compute_s for p in trace.points[s + 1:e + 1])  # compute_s: the interval before a point


def run_deepspeed(a: argparse.Namespace, directory: Path, ds: Dict[str, Any]) -> Dict[str, Any]:
    nvme = directory / "deepspeed-nvme"
    nvme.mkdir(parents=True, exist_ok=True)
    args = {"vocab": a.vocab, "seq": a.seq, "layers": a.layers, "heads": a.heads, "d_model": a.d_model,
            "batch": a.batch, "steps": a.steps, "dir": str(nvme), "ds": ds, "clip": a.clip}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _DEEPSPEED, json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}", "DS_ACCELERATOR": "cpu"})
    wall = time.perf_counter() - start
    shutil.rmtree(nvme, ignore_errors=True)
    if done.returncode != 0:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": " | ".join(tail) or f"exit {done.returncode} (killed: signal {-done.returncode})"
                if done.returncode < 0 else " | ".join(tail), "returncode": done.returncode, "wall_s": wall}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["rss_growth_bytes"] = out["peak_rss_bytes"] - out["baseline_rss_bytes"]
    out["wall_s"] = wall
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="a directory on the disk under test")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="steps in all; the first --warmup + 1 build the plan")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--budget-gib", type=float, default=2.0, help="tierflow's device (RAM) budget")
    p.add_argument("--clip", type=float, default=1.0, help="clipping by global norm (0: none; tierflow then "
                                                            "updates inside backward)")
    p.add_argument("--peers", default="tierflow,deepspeed")
    p.add_argument("--fio-gib", type=float, default=2.0)
    p.add_argument("--ds", default="{}", help="DeepSpeed buffer settings as JSON (see _deepspeed.ZERO3_DEFAULTS)")
    p.add_argument("--quick", action="store_true", help="a small model, seconds")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.layers, a.heads, a.steps, a.budget_gib, a.fio_gib = 256, 2, 4, 3, 0.02, 0.25
    a.dir.mkdir(parents=True, exist_ok=True)
    params = 12 * a.layers * a.d_model ** 2 + (a.vocab + a.seq) * a.d_model
    print(f"GPT d_model={a.d_model} layers={a.layers}: ~{params / 1e9:.2f}B parameters, "
          f"{16 * params / GiB:.1f} GiB of fp32 training state (AdamW); RAM {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.1f} GiB",
          flush=True)
    results: Dict[str, Any] = {"model": {"d_model": a.d_model, "layers": a.layers, "vocab": a.vocab, "seq": a.seq,
                                         "batch": a.batch, "parameters_estimate": params}}
    results["fio"] = fio(a.dir, a.fio_gib)
    print("fio", {k: f"{v / MiB:,.0f} MiB/s" for k, v in results["fio"].items()}, flush=True)
    peers = a.peers.split(",")
    if "tierflow" in peers:
        results["tierflow"] = run_tierflow(a, a.dir)
        print("tierflow", _line(results["tierflow"]), flush=True)
    if "deepspeed" in peers:
        ds = {**ZERO3_DEFAULTS, **json.loads(a.ds)}
        results["deepspeed_settings"] = ds
        results["deepspeed"] = run_deepspeed(a, a.dir, ds)
        print("deepspeed", _line(results["deepspeed"]), flush=True)
    _report(results)
    if a.out is not None:
        a.out.write_text(json.dumps(results, indent=1))
    return 0


def _line(r: Dict[str, Any]) -> str:
    if "error" in r:
        return f"FAILED after {r['wall_s']:.0f} s: {r['error'][:300]}"
    steps = r.get("planned_step_s") or r["step_s"][1:] or r["step_s"]
    return (f"peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB (+{r['rss_growth_bytes'] / GiB:.2f} after imports), "
            f"steps {', '.join(f'{s:.1f}' for s in r['step_s'])} s (steady {min(steps):.1f} s)")


def _report(results: Dict[str, Any]) -> None:
    t, d, f = results.get("tierflow"), results.get("deepspeed"), results.get("fio", {})
    if t and "error" not in t and t["planned_step_s"]:
        step, moved = min(t["planned_step_s"]), max(t["planned_bytes_moved"])
        bw = (f.get("read", 0) + f.get("write", 0)) / 2 if f else 0
        io_s = moved / bw if bw else float("nan")
        limit = max(io_s, t["compute_s"] or 0.0)
        print(f"tierflow planned step {step:.1f} s; moved {moved / GiB:.1f} GiB = {io_s:.1f} s at fio's mean "
              f"{bw / MiB:,.0f} MiB/s; traced compute {t['compute_s'] or float('nan'):.1f} s; "
              f"step / max(compute, I/O) = {step / limit:.2f}x")
        results["limit_ratio"] = step / limit
    if t and d and "error" not in t and "error" not in d:
        ts = min(t["planned_step_s"] or t["step_s"])
        dsteps = d["step_s"][1:] or d["step_s"]
        ratio_time, ratio_rss = min(dsteps) / ts, d["peak_rss_bytes"] / t["peak_rss_bytes"]
        print(f"deepspeed / tierflow: step time {ratio_time:.2f}x, peak RSS {ratio_rss:.2f}x")
        results["ratios"] = {"step_time_deepspeed_over_tierflow": ratio_time,
                             "peak_rss_deepspeed_over_tierflow": ratio_rss}


if __name__ == "__main__":
    sys.exit(main())
