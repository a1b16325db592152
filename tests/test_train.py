"""The loop end to end, in process: it learns, it is deterministic, it writes what it promises."""

import json
import math
import stat
import time

import numpy as np
import pytest
import torch

from tierflow.trainer.compose import load_config
from tierflow.trainer.step import parameter_digest
from tierflow.trainer.train import train


def _train(overrides):
    cfg, _ = load_config(overrides)
    return train(cfg)


def test_tiny_model_learns_the_synthetic_task(quiet):
    result = _train(quiet + ["trainer.steps=300", "trainer.eval_batches=4"])
    floor, uniform = result.summary["data_loss_floor"], math.log(256)
    # Stated threshold: within 0.3 nats of the data's loss floor, i.e. far below uniform (5.55).
    assert result.summary["final_val_loss"] < floor + 0.3
    assert result.losses[-1] < 0.3 * uniform
    assert result.losses[0] > uniform - 0.5  # it started from knowing nothing


def test_same_seed_gives_identical_losses_and_parameters(quiet):
    runs = [_train(quiet + ["trainer.steps=12", "trainer.grad_accum=2", f"logging.run_name=r{i}"]) for i in range(2)]
    a, b = runs
    assert torch.equal(torch.tensor(a.losses), torch.tensor(b.losses))
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
    other = _train(quiet + ["trainer.steps=12", "trainer.grad_accum=2", "trainer.seed=1", "logging.run_name=r3"])
    assert not torch.equal(torch.tensor(a.losses), torch.tensor(other.losses))


def test_gradient_accumulation_matches_one_big_batch(quiet):
    one = _train(quiet + ["trainer.steps=5", "trainer.grad_accum=1", "logging.run_name=a1"])
    four = _train(quiet + ["trainer.steps=5", "trainer.grad_accum=4", "logging.run_name=a4"])
    # Same samples, summed in another order: equal up to float rounding, not bit-identical.
    np.testing.assert_allclose(one.losses, four.losses, rtol=1e-4)
    for pa, pb in zip(one.model.parameters(), four.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_run_directory_holds_owner_only_outputs(quiet):
    overrides = [o for o in quiet if not o.startswith("logging.plot")] + ["trainer.steps=6", "trainer.eval_every=3",
                                                                          "logging.run_name=out"]
    result = _train(overrides)
    run_dir = result.run_dir
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o600, name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_loss"] == result.losses[-1]
    assert summary["param_digests"] == [parameter_digest(result.model)]
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_reusing_a_finished_run_directory_is_refused(quiet):
    _train(quiet + ["trainer.steps=2", "logging.run_name=same"])
    with pytest.raises(ValueError, match="already holds a finished run"):
        _train(quiet + ["trainer.steps=2", "logging.run_name=same"])


def test_wandb_logs_offline_into_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = _train([f"logging.run_root={tmp_path}", "logging.run_name=w", "logging.progress=false",
                     "logging.plot=false", "trainer.steps=3", "trainer.eval_every=0", "trainer.eval_batches=1"])
    offline = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert any(offline[0].glob("*.wandb"))


def test_user_module_trains_through_model_target(quiet):
    result = _train(quiet + ["model._target_=tests.helpers.BigramLM", "+model.kwargs.hidden=16",
                             "trainer.steps=40", "optimizer.warmup_steps=2", "optimizer.lr=0.02"])
    assert result.summary["model"] == "BigramLM"
    assert result.losses[-1] < result.losses[0] - 0.5


def test_trains_on_a_token_file(quiet, tmp_path):
    path = tmp_path / "tokens.bin"
    # A periodic text (0..49 repeated): the next token is a function of the current one.
    np.tile(np.arange(50, dtype=np.uint16), 400).tofile(path)
    result = _train(quiet + ["data=tokens", f"data.path={path}", "data.vocab_size=50", "data.seq_len=32",
                             "trainer.steps=40", "optimizer.warmup_steps=5"])
    assert result.summary["data_loss_floor"] is None
    assert result.losses[-1] < 0.5 * math.log(50)


def test_bf16_autocast_runs_on_cpu(quiet):
    result = _train(quiet + ["trainer.steps=3", "trainer.precision=bf16"])
    assert result.summary["precision"] == "bfloat16"
    assert all(math.isfinite(x) for x in result.losses)


def test_profiling_inside_the_loop_writes_a_trace_and_changes_no_result(quiet):
    from tierflow.profiling import load_trace

    plain = _train(quiet + ["trainer.steps=6", "logging.run_name=plain"])
    traced = _train(quiet + ["trainer.steps=6", "trainer.profile_iterations=2", "trainer.profile_warmup=2",
                             "logging.run_name=traced"])
    assert torch.equal(torch.tensor(plain.losses), torch.tensor(traced.losses))
    for pa, pb in zip(plain.model.parameters(), traced.model.parameters()):
        assert torch.equal(pa, pb)
    trace = load_trace(traced.run_dir / "trace.tftrace")
    assert trace.num_iterations == 2
    assert (traced.run_dir / "profile.txt").read_text().startswith("tierflow: lifetime trace")
    assert traced.summary["profile"] == str(traced.run_dir / "profile.txt")
    assert "profile" not in plain.summary


def test_a_tiers_preset_that_training_cannot_use_yet_warns(quiet):
    with pytest.warns(UserWarning, match="tiers=h100_sxm_pcie5_2nvme .* is not used: offload.policy=none"):
        result = _train(quiet + ["trainer.steps=2", "tiers=h100_sxm_pcie5_2nvme"])
    assert len(result.losses) == 2


def test_a_run_resumed_after_its_last_step_finishes_cleanly_and_keeps_its_state(quiet, snapshot_store_dir):
    """Killed after the final step was logged, the same command again: nothing is left to train, so
    it reports where the run stands and exits cleanly, with the same weights (it used to crash on
    the empty loss list, and that crash freed the snapshot)."""
    overrides = quiet + ["trainer.steps=4", "trainer.global_batch=4", "checkpoint=memory",
                         "checkpoint.every_steps=2", "checkpoint.persist_on_finish=false",
                         "checkpoint.free_on_finish=false", "checkpoint.parity_shards=0",
                         f"checkpoint.store_dir={snapshot_store_dir}"]
    # The same command: the same run identity (Note [run identity]); each gets its own timestamped directory.
    first = train(load_config(overrides)[0])
    time.sleep(1.1)
    again = train(load_config(overrides)[0])
    assert again.losses == [] and again.summary["resumed_from_step"] == 4 and again.summary["steps_run"] == 0
    assert again.summary["param_digests"] == first.summary["param_digests"]
    assert again.summary["final_val_loss"] == first.summary["final_val_loss"]
    assert again.records == [{"step": 4, "loss": first.losses[-1], "resumed_from": "memory"}]
    time.sleep(1.1)
    third = train(load_config(overrides)[0])  # the state is still there
    assert third.summary["resumed_from_step"] == 4 and third.summary["param_digests"] == first.summary["param_digests"]
