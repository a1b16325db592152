"""Persisted checkpoints are verified before anything in them is parsed, and carry no pickles.

Note [verify before parsing] (persist.py) and Note [no pickles] (_codec.py): a flipped bit, a
truncated file, a loose permission or a crafted DCP ``.metadata`` is found before it is used; the
next older copy is taken instead, with a warning; only when none verifies does the run stop, in
one line naming every copy tried.
"""

import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from tierflow.trainer.checkpoint._codec import decode, encode
from tierflow.trainer.checkpoint.persist import (
    CheckpointCorruptError,
    _file_digest,
    load_checkpoint,
    newest_verified,
    save_checkpoint,
    verify_checkpoint,
)


def _meta(step):
    return {"step": step, "config_hash": "abc", "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["w"]}],
            "optim_scalars": {}, "scheduler": {"last_epoch": step, "_last_lr": [float("inf")]},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()
                    .numpy().tobytes()}}


def _save(root, step):
    tensors = {"model.w": torch.arange(4096, dtype=torch.float32) + step, "optim.w.exp_avg": torch.ones(64)}
    return save_checkpoint(root, step, tensors, _meta(step), rank=0, world_size=1, keep=5)


def _distcp(path):
    return sorted(path.glob("*.distcp"))[0]


def test_a_copy_round_trips_without_pickles_and_verifies(tmp_path):
    path = _save(tmp_path, 3)
    assert verify_checkpoint(path) is None
    tensors, meta = load_checkpoint(path, 0)
    assert torch.equal(tensors["model.w"], torch.arange(4096, dtype=torch.float32) + 3)
    want = _meta(3)
    assert meta["param_groups"] == want["param_groups"] and meta["scheduler"] == want["scheduler"]
    assert meta["rng"]["python"] == want["rng"]["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(meta["rng"]["numpy"], want["rng"]["numpy"]))
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert all(isinstance(md, TensorStorageMetadata) for md in entries.values())  # no pickled items of ours
    assert oct(path.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("damage", ["flip_distcp", "truncate_distcp", "truncate_metadata", "drop_file"])
def test_a_damaged_copy_is_skipped_for_the_next_older_one(tmp_path, damage):
    _save(tmp_path, 1)
    newer = _save(tmp_path, 2)
    if damage == "flip_distcp":
        f = _distcp(newer)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        f.write_bytes(bytes(data))
    elif damage == "truncate_distcp":
        f = _distcp(newer)
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "truncate_metadata":
        f = newer / ".metadata"
        f.write_bytes(f.read_bytes()[:20])
    else:
        _distcp(newer).unlink()
    assert verify_checkpoint(newer) is not None
    with pytest.warns(UserWarning, match="skipping the persisted checkpoint .*step-00000002"):
        (step, path), = newest_verified(tmp_path)
    assert step == 1
    assert torch.equal(load_checkpoint(path, 0)[0]["model.w"], torch.arange(4096, dtype=torch.float32) + 1)


def test_when_no_copy_verifies_the_run_stops_in_one_line_naming_each(tmp_path):
    for step in (1, 2):
        f = _distcp(_save(tmp_path, step))
        f.write_bytes(f.read_bytes()[:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointCorruptError) as err:
            newest_verified(tmp_path)
    text = str(err.value)
    assert "step-00000002" in text and "step-00000001" in text and "\n" not in text
    assert "checkpoint.restore=none" in text


def test_loose_permissions_are_refused_before_parsing(tmp_path):
    path = _save(tmp_path, 1)
    os.chmod(path, 0o770)
    assert "writable by group or others" in verify_checkpoint(path)
    os.chmod(path, 0o700)
    os.chmod(path / ".metadata", 0o666)
    assert "writable by group or others" in verify_checkpoint(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_file_of_another_user_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    os.chown(_distcp(path), 12345, 12345)
    assert "belongs to uid 12345" in verify_checkpoint(path)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_a_crafted_metadata_pickle_never_runs(tmp_path):
    """A ``.metadata`` replaced by a pickle that runs a command, the manifest updated to match, the
    file left writable by others (how another user could plant it): refused before it is read."""
    path = _save(tmp_path, 1)
    _Boom.marker = tmp_path / "pwned"
    meta = path / ".metadata"
    meta.write_bytes(pickle.dumps(_Boom()))
    import json

    manifest = json.loads((path / "tierflow.json").read_text())
    manifest["files"][".metadata"] = _file_digest(meta)
    (path / "tierflow.json").write_text(json.dumps(manifest))
    os.chmod(meta, 0o666)
    with pytest.raises(CheckpointCorruptError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            newest_verified(tmp_path)
    assert not _Boom.marker.exists()


def test_the_codec_round_trips_state_and_refuses_what_it_cannot_hold():
    value = {"t": (1, 2.5, None, True), "b": b"\x00\xff", "a": np.arange(5, dtype=np.uint32), "inf": float("-inf"),
             "x": torch.tensor([1.5, 2.0]), 3: [{"nested": (np.float32(1.25),)}]}
    back = decode(encode(value))
    assert back["t"] == (1, 2.5, None, True) and back["b"] == b"\x00\xff" and back["inf"] == float("-inf")
    assert np.array_equal(back["a"], value["a"]) and back["a"].dtype == np.uint32
    assert torch.equal(back["x"], value["x"]) and back[3] == [{"nested": (1.25,)}]
    with pytest.raises(TypeError, match=r"state\['f'\] is a function"):
        encode({"f": lambda: 0})
    with pytest.raises(ValueError, match="not tierflow's JSON"):
        decode(b'{"os.system": ["ls"]}')
