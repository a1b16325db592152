"""In-memory snapshots attached to a DeepSpeed engine (CPU accelerator, gloo, 2 ranks): ZeRO-2 and ZeRO-3
runs interrupted after 6 steps and restored into a fresh engine equal an uninterrupted 10-step run exactly."""

import json
import subprocess

import pytest
import torch

from tests.conftest import PYTHON, REPO
from tierflow.trainer.checkpoint.deepspeed import _join, _split, _TensorRef, attach_snapshots, snapshot_config


def test_state_dict_tensors_split_out_and_come_back_as_copies():
    sd = {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}}, "groups": [torch.zeros(2), 7],
          "scaler": "static", "pair": (torch.arange(2), None)}
    tensors = []
    tree = _split(sd, "optim.rank1", tensors)
    assert [k for k, _ in tensors] == ["optim.rank1/state/0/exp_avg", "optim.rank1/state/0/step",
                                       "optim.rank1/groups/0", "optim.rank1/pair/0"]
    assert tree["groups"][0] == _TensorRef("optim.rank1/groups/0") and tree["groups"][1] == 7
    back = _join(tree, dict(tensors))
    assert torch.equal(back["state"][0]["exp_avg"], sd["state"][0]["exp_avg"]) and back["scaler"] == "static"
    assert isinstance(back["pair"], tuple) and back["pair"][1] is None
    assert back["state"][0]["exp_avg"].data_ptr() != sd["state"][0]["exp_avg"].data_ptr()  # never aliased


def test_attach_rejects_what_it_cannot_snapshot():
    with pytest.raises(ValueError, match="Key 'every_step' not in 'CheckpointConfig'"):
        attach_snapshots(object(), {"every_step": 1})
    with pytest.raises(ValueError, match="needs a DeepSpeedEngine with an optimizer"):
        attach_snapshots(object(), {"every_steps": 1})
    assert attach_snapshots(object(), {"enabled": False}).restore() == 0  # disabled: inert


def test_the_tierflow_checkpoint_section_of_the_deepspeed_config_is_read():
    from types import SimpleNamespace

    engine = SimpleNamespace(config={"tierflow": {"checkpoint": {"every_steps": 3, "keep": 4}}})
    cfg = snapshot_config(engine)
    assert cfg.enabled and cfg.every_steps == 3 and cfg.keep == 4
    with pytest.warns(UserWarning, match="tierflow.checkpoint section .* is ignored"):
        assert snapshot_config(engine, {"every_steps": 5}).every_steps == 5  # explicit settings win
    assert snapshot_config(SimpleNamespace(config={"train_batch_size": 4})).every_steps == 10  # no section: defaults
    off = SimpleNamespace(config={"tierflow": {"checkpoint": {"enabled": False}}})
    assert attach_snapshots(off).checkpointer is None  # disabled by the section: inert, no engine needed
    for bad, message in (({"every_step": 1}, "tierflow.checkpoint: Key 'every_step' not in 'CheckpointConfig'"),
                         ({"every_steps": 0}, "tierflow.checkpoint.every_steps=0 must be > 0")):
        with pytest.raises(ValueError, match=message):
            attach_snapshots(SimpleNamespace(config={"tierflow": {"checkpoint": bad}}))


@pytest.mark.slow
def test_zero2_and_zero3_resume_from_memory_bit_identically(subprocess_env, free_port, snapshot_store_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is installed by the dev extra; run ./launch/setup.sh test")
    env = {**subprocess_env, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "_ckpt_deepspeed_job.py"), "2,3", str(snapshot_store_dir), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {int(f.stem[len("result"):]): json.loads(f.read_text()) for f in tmp_path.glob("result*.json")}
    assert sorted(results) == [0, 1]
    for rank, per_stage in results.items():
        for stage in ("2", "3"):
            r = per_stage[stage]
            assert r["start"] == 6 and r["restored"] == "memory", (rank, stage, r)
            assert r["got"] == r["want"], f"ZeRO-{stage} rank {rank}: losses differ after the restore"
            assert r["got_digest"] == r["want_digest"], f"ZeRO-{stage} rank {rank}: parameters differ"
    assert results[0]["2"]["want"] != results[1]["2"]["want"]  # the ranks saw different data
