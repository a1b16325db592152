"""DeepSpeed (CPU accelerator, gloo) with in-memory snapshots: interrupted and resumed vs uninterrupted.

Run by tests/test_checkpoint_deepspeed.py under torchrun (DeepSpeed's process group stays out of
pytest). For each ZeRO stage: an uninterrupted run of STEPS steps; then a run that snapshots every
step and is torn down after CUT steps without finishing (a crash, as far as the store can tell);
then a fresh engine, built from other initial weights and another RNG state, restores the
snapshot and trains on. Each rank writes ``{stage: {...}}`` to ``<out dir>/result<rank>.json``.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests._deepspeed_gloo import init_deepspeed_on_gloo  # noqa: E402
from tierflow.trainer.distributed import end_process  # noqa: E402

STEPS, CUT = 10, 6


def _engine(stage: int, seed: int):
    import deepspeed

    from tierflow.trainer.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, mlp_ratio=4, dropout=0.1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              # torch_adam: torch's AdamW. DeepSpeed's own would build its CPU FusedAdam op first (80 s of a
              # clean CI run), and what these tests check does not depend on the kernel.
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3,
                                                            "warmup_num_steps": 4}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 50000, "allgather_bucket_size": 50000,
                                    "stage3_prefetch_bucket_size": 50000,
                                    "stage3_param_persistence_threshold": 100}}  # small ones stay whole
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _train(engine, start: int, stop: int, snaps=None):
    losses = []
    rank = torch.distributed.get_rank()
    for step in range(start, stop):
        g = torch.Generator().manual_seed(1000 * step + rank)  # the data position is the step
        tokens = torch.randint(0, 64, (2, 17), generator=g)
        loss = F.cross_entropy(engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        if snaps is not None:
            snaps.after_step(step + 1)
        losses.append(loss.item())
    return losses


def _digest(engine, stage: int) -> str:
    import deepspeed

    from tierflow.trainer.step import parameter_digest

    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return parameter_digest(engine.module)
    return parameter_digest(engine.module)


def run(stage: int, store_dir: str) -> dict:
    from tierflow.trainer.checkpoint.deepspeed import attach_snapshots

    cfg = {"every_steps": 1, "parity_shards": 1 if torch.distributed.get_world_size() > 1 else 0,
           "node_id": "n%r", "store_dir": store_dir, "persist_on_finish": False}
    ref = _engine(stage, seed=0)
    want = _train(ref, 0, STEPS)
    want_digest = _digest(ref, stage)
    ref.destroy()

    first = _engine(stage, seed=0)
    snaps = attach_snapshots(first, cfg, config_hash=f"dsjob-stage{stage}")
    assert snaps.restore() == 0
    before = _train(first, 0, CUT, snaps)
    snaps.checkpointer.snap.drain()  # the last snapshot is durable; then the "crash": no finish()
    snaps.abort()
    first.destroy()

    torch.manual_seed(12345)  # another RNG state and other initial weights: all must come back
    second = _engine(stage, seed=7)
    snaps = attach_snapshots(second, cfg, config_hash=f"dsjob-stage{stage}")
    start = snaps.restore()
    after = _train(second, start, STEPS, snaps)
    snaps.finish(STEPS)
    got_digest = _digest(second, stage)
    second.destroy()
    return {"want": want, "got": before + after, "start": start, "want_digest": want_digest,
            "got_digest": got_digest, "restored": snaps.summary().get("resumed_from")}


if __name__ == "__main__":
    stages = [int(s) for s in sys.argv[1].split(",")]
    store_dir = sys.argv[2]
    init_deepspeed_on_gloo()
    results = {stage: run(stage, store_dir) for stage in stages}
    # One file per rank: two ranks printing long lines to one pipe can interleave them.
    out = Path(sys.argv[3]) / f"result{torch.distributed.get_rank()}.json"
    out.write_text(json.dumps(results))
    end_process(0, held_group=True)  # Note [a finished rank exits without destructors]
