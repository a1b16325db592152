"""Child of tests/test_fsdp2.py (under torchrun): what the tracer records of gloo's hidden
collective buffers (Note [hidden collective buffers]) on an FSDP2 model, and what a budget that
leaves no room for them does.

Writes ``rank<N>.json`` into the directory given as the first argument: the expected buffer sizes
(per FSDP2 unit, the world size times this rank's padded shard bytes), the traced ones with the
points they live between, and the online policy's peak under a budget.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tierflow.offload.integrations.fsdp2 import shard_blocks
from tierflow.profiling import LifetimeTracer, local_tensor
from tierflow.trainer.distributed import end_process
from tierflow.trainer.model import GPT, GPTConfig


def _unit_bytes(module: torch.nn.Module, world: int, own_only: bool) -> int:
    params = module.parameters(recurse=not own_only) if not own_only else \
        [p for n, p in module.named_parameters() if not n.startswith("blocks.")]
    return world * sum(local_tensor(p).untyped_storage().nbytes() for p in params)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=64)
    torch.manual_seed(0)
    model = shard_blocks(GPT(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    expected = sorted([_unit_bytes(b, world, False) for b in model.blocks] + [_unit_bytes(model, world, True)])
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=torch.Generator().manual_seed(rank))
    _step(model, optimizer, tokens)  # FSDP2's lazy initialisation, outside the trace
    tracer = LifetimeTracer(model, optimizer)
    with tracer:
        with tracer.iteration():
            _step(model, optimizer, tokens)
    trace = tracer.trace()
    names = [f"{p.kind.value}:{p.name}" for p in trace.points]
    rows = [{"key": r.key, "bytes": r.size_bytes, "created": names[r.created], "freed": names[r.freed],
             "span": r.freed - r.created} for r in trace.tensors if ":collective" in r.key]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"expected": expected, "rows": rows }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process(0, held_group=True)  # Note [a finished rank exits without destructors]
