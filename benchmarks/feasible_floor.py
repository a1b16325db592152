"""The smallest device budget any plan can meet, for transformers' GPT-2 with and without dropout.

    python benchmarks/feasible_floor.py [--layers 2] [--width 128] [--seq 128] [--batch 4]

Traces one steady training iteration of a randomly initialised GPT-2 (``transformers``, built from
a config) per dropout setting, then prints the feasible floor the planner computes for it (the
unconstrained peak minus every idle interval a plan may move, Note [pinned until saved] in
``offload/runtime/_schedule.py`` for what may move), as bytes and as a fraction of the peak, with
every category movable and with only activations and gradients movable. No budget below the floor
has a plan; the runtime then says so before training. Not run by CI (needs ``transformers``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tierflow.offload.plan import Budgets, feasible_minimum_bytes  # noqa: E402
from tierflow.offload.plan.context import build_context  # noqa: E402
from tierflow.offload.runtime._schedule import one_iteration, pin_unmovable  # noqa: E402
from tierflow.profiling import LifetimeTracer, TracerConfig  # noqa: E402

MOVABLE = {"all": frozenset({"param", "grad", "optimizer_state", "activation"}),
           "activations+grads": frozenset({"activation", "grad"})}


def trace_gpt2(dropout: float, args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_head=4, n_embd=args.width, vocab_size=512, n_positions=args.seq,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer makes its states here: trace the next, steady iteration
    tracer = LifetimeTracer(model, opt, TracerConfig(subtract_dispatch_cost=False))
    with tracer:
        with tracer.iteration():
            tracer.mark_inputs(x)
            step()
    return one_iteration(tracer.trace(), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"GPT-2 ({args.layers} layers, width {args.width}, {args.batch}x{args.seq} tokens), fp32 AdamW, CPU trace")
    print(f"{'dropout':>8} {'movable':>18} {'peak':>12} {'floor':>12} {'floor/peak':>10}")
    for dropout in (0.0, 0.1):
        trace = trace_gpt2(dropout, args)
        for name, movable in MOVABLE.items():
            ctx = build_context(pin_unmovable(trace, movable), None, Budgets())
            floor, _ = feasible_minimum_bytes(ctx)
            peak = int(ctx.interval_peak.max())
            print(f"{dropout:>8} {name:>18} {peak:>12,} {floor:>12,} {floor / peak:>10.1%}")


if __name__ == "__main__":
    main()
