"""DeepSpeed ZeRO with tierflow's planned activation offload vs DeepSpeed's own activation checkpointing.

One process, DeepSpeed's CPU accelerator and gloo (or CUDA where there is a GPU), three runs of the
built-in GPT with the same batches:

1. ``zero``        plain DeepSpeed ZeRO (``--stage``), every activation kept: the unconstrained run.
2. ``ds-ckpt``     the same with ``deepspeed.checkpointing.checkpoint`` around every block.
3. ``tierflow``    the same with ``tierflow.offload.integrations.deepspeed.attach``, the device budget set to the peak
                   that ``ds-ckpt`` reached (equal peak memory), lifetime policy, host tier.

The peaks are measured the same way for all three: tierflow's LifetimeTracer over one iteration
(device bytes alive; on CUDA also the allocator's high-water mark). Prints tokens/s and ratios, and
checks that ``tierflow`` reaches the same losses as ``zero`` bit for bit.

    .venv/bin/python benchmarks/deepspeed_activations.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for _key, _value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29731")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _Checkpointed(nn.Module):
    """A block run under DeepSpeed's activation checkpointing (recomputed in backward)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import deepspeed

        return deepspeed.checkpointing.checkpoint(self.block, x)


def _model(args: argparse.Namespace, checkpointed: bool) -> nn.Module:
    from tierflow.trainer.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, n_layer=args.layers, n_head=args.heads,
                          d_model=args.d_model, mlp_ratio=4, dropout=0.0))
    if checkpointed:
        model.blocks = nn.ModuleList(_Checkpointed(b) for b in model.blocks)
    return model


def _batches(args: argparse.Namespace, n: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g) for _ in range(n)]


def _ds_config(args: argparse.Namespace) -> Dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
            "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 2_000_000,
                                  "allgather_bucket_size": 2_000_000, "stage3_prefetch_bucket_size": 2_000_000}}


def _traced_peak(engine: Any, tokens: torch.Tensor, step: Any) -> int:
    from tierflow.profiling import LifetimeTracer, memory_timeline

    tracer = LifetimeTracer(engine.module, None)
    with tracer:
        with tracer.iteration():
            tracer.mark_inputs(tokens)
            step(tokens)
    return memory_timeline(tracer.trace()).peak.total_bytes


def run(args: argparse.Namespace, name: str, budget_bytes: Optional[int] = None) -> Dict[str, Any]:
    import deepspeed

    from tierflow.offload.integrations.deepspeed import attach

    model = _model(args, checkpointed=name == "ds-ckpt")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(args))
    tf = None
    if name == "tierflow":
        tf = attach(engine, {"offload": {"policy": "lifetime", "device_budget_bytes": budget_bytes,
                                         "profile_warmup": 1, "profile_iterations": 2},
                             "tiers": {"host": {"enabled": True, "budget_bytes": 4 << 30}}})

    def step(tokens: torch.Tensor) -> float:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss = F.cross_entropy(engine(inputs).flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()
        return loss.item()

    losses, times = [], []
    warm = 3  # tierflow: warm-up + two profiled steps before the plan runs; the same for every run
    for i, tokens in enumerate(_batches(args, warm + args.steps)):
        t0 = time.perf_counter()
        if tf is not None:
            with tf.step(tokens[:, :-1]):
                losses.append(step(tokens))
        else:
            losses.append(step(tokens))
        if i >= warm:
            times.append(time.perf_counter() - t0)
    peak = _traced_peak(engine, _batches(args, 1)[0], step) if tf is None else \
        tf.runtime.summary().get("device_peak_bytes", 0)
    out = {"name": name, "losses": losses, "step_s": median(times), "tokens_per_s": args.batch * args.seq_len /
           median(times), "peak_bytes": int(peak)}
    if tf is not None:
        s = tf.summary()
        out.update(modes=s.get("steps"), stall_s=s.get("stall_s"), budget_bytes=budget_bytes)
        tf.close()
    engine.destroy()
    return out


def _same_prefix(a: List[float], b: List[float]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "deepspeed_activations.json")
    args = p.parse_args(argv)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    plain = run(args, "zero")
    ckpt = run(args, "ds-ckpt")
    ours = run(args, "tierflow", budget_bytes=ckpt["peak_bytes"])
    print(f"\nDeepSpeed ZeRO-{args.stage}, GPT {args.layers}x{args.d_model}, batch {args.batch}x{args.seq_len}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; median of {args.steps} steps")
    print(f"{'run':<10} {'tokens/s':>10} {'vs zero':>8} {'peak MiB':>9}")
    for r in (plain, ckpt, ours):
        print(f"{r['name']:<10} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / plain['tokens_per_s']:>7.3f}x "
              f"{r['peak_bytes'] / 2**20:>9.1f}")
    print(f"tierflow / ds-ckpt tokens/s at equal peak: {ours['tokens_per_s'] / ckpt['tokens_per_s']:.3f}x; "
          f"tierflow peak {ours['peak_bytes'] / 2**20:.1f} MiB vs budget {ckpt['peak_bytes'] / 2**20:.1f} MiB; "
          f"losses bit-identical to zero: {_same_prefix(ours['losses'], plain['losses'])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                     "runs": [plain, ckpt, ours]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
