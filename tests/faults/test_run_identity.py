"""A run's snapshots and persisted copies belong to that run (Note [run identity] in manager.py).

* The same command after a reboot (store and its segments gone) resumes from the run's own
  persisted copy, found at the same place whatever its timestamped run directory is.
* Another run with the same training config (another run root, another world size) never
  adopts or frees the first one's snapshots.
"""

import time

from tierflow.trainer.checkpoint import default_persist_dir, list_stores, run_identity, stop_store
from tierflow.trainer.checkpoint.store import StoreClient
from tierflow.trainer.compose import load_config
from tierflow.trainer.train import train


def _cfg(root, store_dir, *extra):
    return load_config(["offload=none", "logging=none", "logging.progress=false", "logging.plot=false",
                        f"logging.run_root={root}", "model=tiny", "trainer.steps=4", "trainer.global_batch=8",
                        "trainer.eval_every=0", "trainer.eval_batches=1", "checkpoint=memory",
                        "checkpoint.every_steps=2", "checkpoint.parity_shards=0", "checkpoint.node_id=n",
                        f"checkpoint.store_dir={store_dir}", *extra])[0]


def test_the_identity_is_the_command_not_its_timestamp(tmp_path):
    a = _cfg(tmp_path / "r1", tmp_path / "s")
    assert run_identity(a, 1) == run_identity(_cfg(tmp_path / "r1", tmp_path / "s"), 1)
    assert run_identity(a, 1) != run_identity(a, 2)
    assert run_identity(a, 1) != run_identity(_cfg(tmp_path / "r2", tmp_path / "s"), 1)
    assert run_identity(a, 1) != run_identity(_cfg(tmp_path / "r1", tmp_path / "s", "logging.run_name=x"), 1)
    assert default_persist_dir(a, run_identity(a, 1)) == (tmp_path / "r1").resolve() / "checkpoints" / \
        run_identity(a, 1)[:16]


def test_the_same_command_after_a_reboot_resumes_from_its_persisted_copy(tmp_path, snapshot_store_dir):
    first = train(_cfg(tmp_path, snapshot_store_dir, "checkpoint.free_on_finish=false"))
    assert first.summary["checkpoints_persisted"] >= 1
    for info in list_stores(snapshot_store_dir):  # the reboot: the store and its segments are gone
        stop_store(snapshot_store_dir, info["node"])
    time.sleep(1.1)  # a new timestamped run directory
    again = train(_cfg(tmp_path, snapshot_store_dir))
    assert again.run_dir != first.run_dir
    assert again.summary["resumed_from_step"] == 4 and again.summary["resumed_from"] == "disk"
    assert again.summary["param_digests"] == first.summary["param_digests"]
    # metrics.jsonl goes on from the step it resumed from, with that step's loss
    import json
    lines = [json.loads(line) for line in (again.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 4, "loss": first.losses[-1], "resumed_from": "disk"}


def test_another_run_with_the_same_config_neither_adopts_nor_frees_the_first_ones_snapshots(
        tmp_path, snapshot_store_dir):
    first = train(_cfg(tmp_path / "one", snapshot_store_dir, "checkpoint.free_on_finish=false",
                       "checkpoint.persist_on_finish=false"))
    store = StoreClient(snapshot_store_dir, "n")
    before = set(store.names())
    assert before  # the first run left its snapshots
    second = train(_cfg(tmp_path / "two", snapshot_store_dir, "checkpoint.persist_on_finish=false"))
    assert "resumed_from_step" not in second.summary  # it trained from step 0
    assert second.losses == first.losses
    assert before <= set(store.names())  # and its finish freed only its own
    store.close()


def test_a_segment_others_can_write_or_own_is_never_used(tmp_path, snapshot_store_dir):
    """Issue 15 item 8: a leftover segment made writable by others (or given to another user) is
    refused with a message naming it, not restored from or written into."""
    import os

    import pytest

    from tierflow.trainer.checkpoint import StoreError

    train(_cfg(tmp_path, snapshot_store_dir, "checkpoint.free_on_finish=false", "checkpoint.persist_on_finish=false"))
    store = StoreClient(snapshot_store_dir, "n")
    name = sorted(store.names())[0]
    path = os.path.join("/dev/shm", name)
    os.chmod(path, 0o666)
    with pytest.raises(StoreError, match="mode 666"):
        store.open_existing(name)
    if os.geteuid() == 0:
        os.chmod(path, 0o600)
        os.chown(path, 12345, 12345)
        with pytest.raises(StoreError, match="belongs to uid 12345"):
            store.open_existing(name)
        os.chown(path, 0, 0)
    store.close()
