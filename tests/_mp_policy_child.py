"""Child of tests/test_fsdp2.py (under torchrun): FSDP2 mixed-precision policies the trainer does
not use, from a user's own loop, with and without tierflow's runtime.

Policies: bf16 gathers with fp32 outputs from the root (``output_dtype``), and bf16 gathers with
``cast_forward_inputs=False``. For each, trains a GPT with ``fully_shard`` alone and again next to
:class:`~tierflow.offload.OffloadRuntime`, and writes ``rank<N>.json`` into the directory given as
the first argument: per policy, both runs' losses, parameter digests (gathered) and the runtime's
step counts.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from tierflow.offload import OffloadConfig, OffloadRuntime
from tierflow.offload.integrations.fsdp2 import block_modules
from tierflow.trainer.distributed import end_process
from tierflow.trainer.model import GPT, GPTConfig

VOCAB, STEPS = 256, 6


def _train(root_policy: MixedPrecisionPolicy, offload: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, seq_len=32, n_layer=3, n_head=4, d_model=96))
    # Blocks gather and return bf16 (a block returning fp32 would feed fp32 into the next bf16
    # LayerNorm); the root's policy is the one under test.
    block = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                 cast_forward_inputs=root_policy.cast_forward_inputs)
    for unit in block_modules(model):
        fully_shard(unit, mp_policy=block)
    fully_shard(model, mp_policy=root_policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runtime = OffloadRuntime(model, optimizer, OffloadConfig(policy="lifetime", device_budget_fraction=0.7)) \
        if offload else None
    data = torch.Generator().manual_seed(dist.get_rank())
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (4, 33), generator=data)
        with runtime.step(tokens) if runtime is not None else torch.enable_grad():
            loss = F.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.full_tensor().detach().numpy().tobytes())
    steps = {}
    if runtime is not None:
        steps = dict(runtime.summary()["steps"])
        runtime.close()
    return {"losses": losses, "digest": digest.hexdigest(), "steps": steps}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    policies = {
        "output_dtype": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                             output_dtype=torch.float32),
        "no_input_cast": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                              cast_forward_inputs=False),
    }
    result = {name: {"alone": _train(p, False), "offloaded": _train(p, True)} for name, p in policies.items()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_process(0, held_group=True)  # Note [a finished rank exits without destructors]
