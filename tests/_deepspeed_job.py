"""Train the tiny GPT under DeepSpeed (CPU accelerator, gloo) with and without tierflow attached.

Run as a script by tests/test_deepspeed_plugin.py (DeepSpeed's process group stays out of pytest):
prints one JSON object {config name: {"losses": [...], "digest": ..., "report": ...}}.

    _deepspeed_job.py STEPS STAGES [SECTION]          ZeRO stages with and without attach()
    _deepspeed_job.py STEPS client SECTION SWAP_DIR   the tiered optimizer as the client optimizer
                                                      (and snapshots, when SECTION has "checkpoint")
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests._deepspeed_gloo import init_deepspeed_on_gloo  # noqa: E402
from tierflow.trainer.distributed import end_process  # noqa: E402


def run(stage: int, tierflow: bool, steps: int, section: dict) -> dict:
    import deepspeed

    from tierflow.offload.integrations.deepspeed import attach
    from tierflow.trainer.model import GPT, GPTConfig
    from tierflow.trainer.step import parameter_digest

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, d_model=32, mlp_ratio=4, dropout=0.0))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              # torch_adam: torch's AdamW. DeepSpeed's own would build its CPU FusedAdam op first (80 s of a
              # clean CI run), and what these tests check does not depend on the kernel.
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
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


def _model():
    from tierflow.trainer.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, d_model=32, mlp_ratio=4, dropout=0.0))


def _train(engine, steps: int, tf=None) -> dict:
    g = torch.Generator().manual_seed(1)
    losses, modes = [], []
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 33), generator=g)
        with tf.step(tokens[:, :-1]) if tf else _null():
            loss = F.cross_entropy(engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
        if tf:
            modes.append(tf.last_report.mode)
    return {"losses": losses, "modes": modes}


def run_client(case: str, steps: int, section: dict, swap_dir: str) -> dict:
    """Stage 0 with torch AdamW, or the tiered AdamW (host / nvme tier), as the client optimizer."""
    import deepspeed

    from tierflow.offload.integrations.deepspeed import attach, tiered_optimizer
    from tierflow.trainer.step import parameter_digest

    model = _model()
    section = dict(section)
    if "nvme" in case:
        section["tiers"] = {"nvme": {"enabled": True, "dirs": [swap_dir], "chunk_bytes": 16384,
                                     "budget_bytes": 1 << 24, "direct": "off"}}
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "zero_optimization": {"stage": 0}, "tierflow": section}
    hyper = {"lr": 3e-3, "weight_decay": 0.1}
    if case.startswith("adamw"):
        opt = torch.optim.AdamW(model.parameters(), **hyper)
    else:
        opt = tiered_optimizer(model, config, base=torch.optim.AdamW, **hyper)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    tf = attach(engine) if case.endswith("+attach") else None
    out = _train(engine, steps, tf)
    out["engine_optimizer"] = type(engine.optimizer).__name__
    if tf:
        out["summary"] = {k: v for k, v in tf.summary().items() if isinstance(v, (int, float, str, bool))}
        out["bytes_moved"] = tf.runtime.totals["bytes_out"]
        tf.close()  # the runtime before the optimizer whose tiers it shares
    if hasattr(opt, "counters"):
        out["num_subgroups"] = opt.num_subgroups
        out["placement"] = {k: len(v) for k, v in opt.placement().items()}
        out["bytes_written"] = opt.counters.get("bytes_written", 0)
        out["swap_files"] = sum(1 for p in Path(swap_dir).rglob("*") if p.is_file())
        opt.close()
    out["digest"] = parameter_digest(engine.module)
    engine.destroy()
    return out


def run_snapshots(steps: int, section: dict) -> dict:
    """Stage 0, tiered client optimizer, snapshots configured by tierflow.checkpoint: a run cut after
    ``steps // 2`` steps and restored into a fresh engine (other weights) equals an uninterrupted one."""
    import deepspeed

    from tierflow.offload.integrations.deepspeed import tiered_optimizer
    from tierflow.trainer.checkpoint.deepspeed import attach_snapshots
    from tierflow.trainer.step import parameter_digest

    def engine(seed: int):
        model = _model()
        if seed:
            torch.manual_seed(seed)
            for p in model.parameters():
                p.data.normal_()
        config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6, "zero_optimization": {"stage": 0},
                  "tierflow": section}
        opt = tiered_optimizer(model, config, lr=3e-3, weight_decay=0.1)
        return deepspeed.initialize(model=model, optimizer=opt, config=config)[0], opt

    def train(e, start: int, stop: int, snaps=None) -> list:
        losses = []
        for step in range(start, stop):  # the batch is a function of the step
            tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(100 + step))
            loss = F.cross_entropy(e(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            e.backward(loss)
            e.step()
            losses.append(loss.item())
            if snaps is not None:
                snaps.after_step(step + 1)
        return losses

    cut = steps // 2
    ref, opt = engine(0)
    want, want_digest = train(ref, 0, steps), parameter_digest(ref.module)
    opt.close(), ref.destroy()
    first, opt = engine(0)
    snaps = attach_snapshots(first, config_hash="dsjob-client")  # settings from tierflow.checkpoint
    every = snaps.checkpointer.cfg.every_steps
    got = train(first, snaps.restore(), cut, snaps)
    snaps.checkpointer.snap.drain()  # the last snapshot is durable; then the "crash": no finish()
    snaps.abort(), opt.close(), first.destroy()
    second, opt = engine(7)
    snaps = attach_snapshots(second, config_hash="dsjob-client")
    start = snaps.restore()
    got += train(second, start, steps, snaps)
    snaps.finish(steps)
    out = {"want": want, "got": got, "start": start, "every_steps": every, "want_digest": want_digest,
           "got_digest": parameter_digest(second.module), "restored": snaps.summary().get("resumed_from")}
    opt.close(), second.destroy()
    return out


def run_zero2_refused(steps: int, section: dict) -> dict:
    """ZeRO-2 told to accept any optimizer: the tiered client optimizer is refused, nothing changes."""
    import deepspeed

    from tierflow.offload.integrations.deepspeed import attach, tiered_optimizer
    from tierflow.trainer.step import parameter_digest

    model = _model()
    before = parameter_digest(model)
    # The helper cannot see the stage here (as with "stage": "auto"), so the later guards must refuse.
    opt = tiered_optimizer(model, {"tierflow": section}, lr=3e-3, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    out = {"engine_optimizer": type(engine.optimizer).__name__}
    try:
        attach(engine, section)
    except ValueError as e:
        out["attach_error"] = str(e)
    try:
        _train(engine, steps)
    except ValueError as e:
        out["step_error"] = str(e)
    out["unchanged"] = parameter_digest(engine.module) == before
    opt.close()
    engine.destroy()
    return out


if __name__ == "__main__":
    from pathlib import Path

    steps = int(sys.argv[1])
    init_deepspeed_on_gloo()
    results = {}
    if sys.argv[2] == "client":
        section, swap_dir = json.loads(sys.argv[3]), sys.argv[4]
        for case in ("adamw", "tiered-host", "tiered-nvme", "tiered-host+attach"):
            results[case] = run_client(case, steps, section, swap_dir)
        results["zero2-refused"] = run_zero2_refused(steps, {k: v for k, v in section.items() if k != "checkpoint"})
        if "checkpoint" in section:
            results["snapshots"] = run_snapshots(steps, section)
        print("RESULT " + json.dumps(results))
        end_process(0, held_group=True)  # Note [a finished rank exits without destructors]
    stages = [int(s) for s in sys.argv[2].split(",")]
    section = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    for stage in stages:
        for tierflow in (False, True):
            results[f"zero{stage}{'+tierflow' if tierflow else ''}"] = run(stage, tierflow, steps, section)
    print("RESULT " + json.dumps(results))
    end_process(0, held_group=True)
