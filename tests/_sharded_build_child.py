"""Child of tests/test_fsdp2.py (under torchrun): a model sharded on the meta device and
materialised rank by rank (Note [sharded build]) holds exactly the shards that ``fully_shard`` of
the eagerly built model holds, padding included; with a tier, the same bytes wait in its slots.

Writes ``rank<N>.json`` into the directory given as the first argument.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tierflow.offload import TierEngine
from tierflow.offload.integrations.fsdp2 import shard_blocks, shard_on_meta
from tierflow.offload.runtime import alias_bytes
from tierflow.offload.runtime.materialize import materialize, record_init
from tierflow.offload.tiers.config import NvmeTierConfig, TiersConfig
from tierflow.profiling import local_tensor
from tierflow.trainer.distributed import end_process
from tierflow.trainer.model import GPT, GPTConfig


def _padded(p: torch.Tensor) -> torch.Tensor:
    """The whole storage FSDP2 keeps this rank's shard in (its rows, then padding)."""
    local = local_tensor(p)
    return alias_bytes(local.untyped_storage()).view(local.dtype).clone()


def main(out: Path, swap: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = GPTConfig(vocab_size=67, seq_len=16, n_layer=2, n_head=2, d_model=30)  # 67 rows: uneven shards
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    eager = shard_blocks(GPT(cfg))
    want = {n: _padded(p) for n, p in eager.named_parameters()}
    results = {}
    engine = TierEngine(TiersConfig(nvme=NvmeTierConfig(enabled=True, dirs=[str(swap / f"rank{rank}")])))
    try:
        for tier in (None, engine.tiers["nvme"]):
            torch.manual_seed(0)
            model, program = record_init(lambda: GPT(cfg))
            sharded, place = shard_on_meta(model, device=cpu, tier=tier)
            materialize(model, program, place=place)
            if tier is None:
                got = {n: _padded(p) for n, p in sharded.named_parameters()}
            else:
                got = {}
                for n, (slot, shape, dtype) in place.slots.items():
                    got[n] = torch.empty(shape, dtype=dtype)
                    tier.read(slot, got[n]).wait()
                results["tier_storages_empty"] = all(
                    local_tensor(p).untyped_storage().nbytes() == 0 for p in sharded.parameters())
                place.free()
            results["in_tier" if tier is not None else "in_memory"] = {
                "names": sorted(got) == sorted(want),
                "equal": all(torch.equal(got[n], want[n]) for n in want if n in got)}
        results["uneven"] = any(local_tensor(p).shape[0] * 2 != p.shape[0] for p in eager.parameters())
    finally:
        engine.close()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    end_process(0, held_group=True)  # Note [a finished rank exits without destructors]
