"""Training throughput of the built-in GPT: the tierflow trainer next to a bare PyTorch loop.

The bare loop is what a nanoGPT-style script does: same model, same batches (drawn from the same
synthetic source inside the timed step), AdamW, cross-entropy, backward, step, and nothing else.
The trainer adds its schedule, clipping, metrics, peak-memory sampling and progress bar. The ratio
trainer/bare is the cost of that machinery, and the trainer's tokens/s is the baseline that later
offloading work is compared against.

Both run in this one process, alternating A B A B over ``--repeats`` rounds so that drift of a
shared machine affects both; the median of each is reported.

    python benchmarks/throughput.py --sizes tiny small --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from tierflow.trainer.build import seed_everything
from tierflow.trainer.compose import load_config
from tierflow.trainer.data import build_source
from tierflow.trainer.model import build_model
from tierflow.trainer.optim import build_optimizer
from tierflow.trainer.train import train


def bare_loop_tokens_per_s(overrides: list[str], steps: int) -> float:
    cfg, _ = load_config(overrides)
    seed_everything(cfg.trainer.seed)
    source = build_source(cfg.data, cfg.trainer.seed)
    model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
    optimizer, _ = build_optimizer(model, cfg.optimizer, steps)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        rows = source.global_batch("train", step, cfg.trainer.global_batch)
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    steady = times[1:]
    return cfg.trainer.global_batch * cfg.data.seq_len * len(steady) / sum(steady)


def trainer_tokens_per_s(overrides: list[str], steps: int, run_root: str, tag: str) -> float:
    cfg, _ = load_config(overrides + [f"trainer.steps={steps}", f"logging.run_root={run_root}",
                                      f"logging.run_name={tag}", "logging=none", "logging.plot=false",
                                      "logging.progress=false", "trainer.eval_every=0", "trainer.eval_batches=1"])
    return train(cfg).summary["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/throughput")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as run_root:
        for size in args.sizes:
            # offload=none: the default config offloads; this compares the plain trainer with a bare loop.
            overrides = [f"model={size}", f"trainer.global_batch={args.global_batch}", "offload=none"]
            bare, ours = [], []
            for r in range(args.repeats):
                bare.append(bare_loop_tokens_per_s(overrides, args.steps))
                ours.append(trainer_tokens_per_s(overrides, args.steps, run_root, f"{size}-{r}"))
            row = {"size": size, "bare_tokens_per_s": statistics.median(bare),
                   "trainer_tokens_per_s": statistics.median(ours),
                   "ratio": statistics.median(o / b for o, b in zip(ours, bare)),
                   "bare_all": bare, "trainer_all": ours}
            rows.append(row)
            print(f"{size:>7}: trainer {row['trainer_tokens_per_s']:>10,.0f} tok/s   bare loop "
                  f"{row['bare_tokens_per_s']:>10,.0f} tok/s   trainer/bare {row['ratio']:.3f}", flush=True)

    machine = {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
               "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    result = {"machine": machine, "steps": args.steps, "repeats": args.repeats,
              "global_batch": args.global_batch, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["bare_tokens_per_s"] for r in rows], 0.4, label="bare PyTorch loop")
    ax.bar([i + 0.2 for i in x], [r["trainer_tokens_per_s"] for r in rows], 0.4, label="tierflow trainer")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["trainer_tokens_per_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [r["size"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title("Built-in GPT training throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
