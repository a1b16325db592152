"""Train the tiny GPT under DeepSpeed (CPU accelerator, gloo) with and without tierflow attached.

Run as a script by tests/test_deepspeed_plugin.py (DeepSpeed's process group stays out of pytest):
prints one JSON object {config name: {"losses": [...], "digest": ..., "report": ...}}.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def run(stage: int, tierflow: bool, steps: int, section: dict) -> dict:
    import deepspeed

    from offload.deepspeed_plugin import attach
    from trainer.model import GPT, GPTConfig
    from trainer.train import parameter_digest

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, d_model=32, mlp_ratio=4, dropout=0.0))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 50000, "allgather_bucket_size": 50000,
                                            "stage3_prefetch_bucket_size": 50000, "stage3_param_persistence_threshold": 0},
              "tierflow": section}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    tf = attach(engine) if tierflow else None
    g = torch.Generator().manual_seed(1)
    losses, modes, peaks = [], [], []
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 33), generator=g)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with tf.step(inputs) if tf else _null():
            loss = F.cross_entropy(engine(inputs).flatten(0, 1), targets.flatten())
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
        if tf:
            r = tf.last_report
            modes.append(r.mode)
            peaks.append([r.device_peak_bytes, r.fallback_settled_peak_bytes])
    out = {"losses": losses, "modes": modes, "peaks": peaks}
    if tf:
        out["summary"] = {k: v for k, v in tf.summary().items() if isinstance(v, (int, float, str))}
        out["bytes_moved"] = tf.runtime.totals["bytes_out"]
        tf.close()
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            out["digest"] = parameter_digest(engine.module)
    else:
        out["digest"] = parameter_digest(engine.module)
    engine.destroy()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    steps = int(sys.argv[1])
    stages = [int(s) for s in sys.argv[2].split(",")]
    section = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage in stages:
        for tierflow in (False, True):
            results[f"zero{stage}{'+tierflow' if tierflow else ''}"] = run(stage, tierflow, steps, section)
    print("RESULT " + json.dumps(results))
