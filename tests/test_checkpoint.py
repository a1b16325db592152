"""Snapshots: the pure parts (header, erasure coding, placement, choosing what to restore) and one
rank's snapshot engine against a real store (torn and corrupted snapshots are never restored)."""

import os
import random
import signal
import subprocess
import textwrap

import pytest
import torch

from tests.conftest import PYTHON, REPO
from tierflow.trainer.checkpoint._erasure import decode_body, encode_body, shard_holders
from tierflow.trainer.checkpoint._format import (
    FULL,
    HEADER_BYTES,
    SHARD,
    SnapshotHeader,
    checksum,
    invalidate,
    newest_valid,
    parse_header,
    verify,
    write_header,
)
from tierflow.trainer.checkpoint.recovery import choose_restore, restore_latest
from tierflow.trainer.checkpoint.snapshotter import Holding, Snapshotter
from tierflow.trainer.checkpoint.store import StoreClient
from tierflow.trainer.config import CheckpointConfig, ConfigError


def _segment(body: bytes, step=3, **kw) -> bytearray:
    buf = bytearray(HEADER_BYTES + len(body))
    buf[HEADER_BYTES:] = body
    h = SnapshotHeader(kind=FULL, step=step, rank=1, world_size=2, run_key="abc", body_len=len(body),
                       body_hash=checksum(body), payload_len=len(body), **kw)
    write_header(buf, h)
    return buf


def test_header_round_trips_and_the_commit_marker_decides():
    buf = _segment(b"x" * 100, step=7)
    h = parse_header(buf)
    assert (h.step, h.rank, h.world_size, h.run_key, h.body_len) == (7, 1, 2, "abc", 100)
    assert verify(buf) == h
    invalidate(buf)  # a writer that started overwriting this slot
    assert parse_header(buf) is None and verify(buf) is None


def test_a_flipped_payload_byte_fails_the_checksum():
    buf = _segment(bytes(range(256)) * 4)
    buf[HEADER_BYTES + 500] ^= 1
    assert parse_header(buf) is not None and verify(buf) is None


def test_newest_valid_keeps_this_run_and_world_newest_first():
    hs = [parse_header(_segment(b"a", step=s)) for s in (2, 6, 4)]
    other = SnapshotHeader(kind=FULL, step=9, rank=1, world_size=2, run_key="zzz", body_len=1, body_hash=0)
    assert [h.step for h in newest_valid(hs + [other, None], "abc", 2)] == [6, 4, 2]
    assert newest_valid(hs, "abc", 4) == []


@pytest.mark.parametrize("k,m", [(1, 1), (1, 2), (2, 1), (3, 2)])
def test_any_k_shards_rebuild_the_body(k, m):
    # Fresh bytes each run, from a printed seed so a body the code gets wrong can be replayed.
    seed = int(os.environ.get("TIERFLOW_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"body seed: {seed} (TIERFLOW_TEST_SEED={seed} replays it)")
    body = random.Random(seed).randbytes(1001)
    shards = [bytes(s) for s in encode_body(body, k, m)]
    assert len(shards) == k + m and len({len(s) for s in shards}) == 1
    import itertools

    for keep in itertools.combinations(range(k + m), k):
        assert decode_body({i: shards[i] for i in keep}, k, m, len(body)) == body
    with pytest.raises(ValueError, match="cannot rebuild"):
        decode_body({i: shards[i] for i in range(k - 1)}, k, m, len(body))


def test_shards_go_to_distinct_other_nodes():
    assert shard_holders(0, ["a", "b", "c"], 2, 1) == [0, 1, 2]
    # Two ranks per node: rank 0's shards skip its node-mate rank 1.
    assert shard_holders(0, ["a", "a", "b", "b"], 1, 1) == [0, 2]
    assert shard_holders(3, ["a", "a", "b", "b"], 1, 1) == [3, 0]
    with pytest.raises(ValueError, match="needs 3 distinct nodes"):
        shard_holders(0, ["a", "a", "b"], 2, 1)


def _h(holder, src, step, kind=FULL, index=0, k=1, m=1):
    return Holding(holder, src, step, int(kind), index, 10, 10, 0, k, m)


def test_choose_restore_prefers_local_then_peers_then_disk():
    # Both ranks hold steps 4 and 6 locally: newest wins.
    both = [_h(r, r, s) for r in (0, 1) for s in (4, 6)]
    plan = choose_restore(both, 2)
    assert (plan.source, plan.step, plan.local, plan.from_peers) == ("memory", 6, (0, 1), {})
    # Rank 1's node is lost: its step-6 shard on rank 0 rebuilds it.
    lost = [_h(0, 0, 6), _h(0, 1, 6, SHARD, 1)]
    plan = choose_restore(lost, 2)
    assert plan.step == 6 and plan.local == (0,) and plan.from_peers == {1: ((0, 1, 10),)}
    # Rank 1's newest is torn or corrupted (not held): the step every rank has.
    torn = [_h(0, 0, 6), _h(0, 0, 4), _h(1, 1, 4)]
    assert choose_restore(torn, 2).step == 4
    # k=2: one shard is not enough.
    assert choose_restore([_h(0, 0, 6), _h(0, 1, 6, SHARD, 1, k=2)], 2).source == "none"
    # A newer disk checkpoint beats older memory; memory wins a tie.
    assert choose_restore(both, 2, [(8, "/ck/step-8")]).source == "disk"
    assert choose_restore(both, 2, [(6, "/ck/step-6")]).source == "memory"
    assert choose_restore([], 2, [(2, "/a"), (4, "/b")]).disk_path == "/b"
    assert choose_restore([], 2).source == "none"


def test_config_rejects_bad_values_with_the_fix():
    with pytest.raises(ConfigError) as e:
        CheckpointConfig(enabled=True, every_steps=0, data_shards=2, restore="tape", node_id="a b")
    msg = str(e.value)
    for key in ("checkpoint.every_steps=0", "data_shards=2 without parity", "checkpoint.restore='tape'",
                "checkpoint.node_id='a b'"):
        assert key in msg
    from tierflow.trainer.checkpoint import check_checkpoint_config

    with pytest.raises(ConfigError, match="larger than the world size 2"):
        check_checkpoint_config(CheckpointConfig(enabled=True, data_shards=2, parity_shards=1), 2)


# --- one rank's engine against a real store ------------------------------------------------


def _parts(seed=0):
    from tierflow.trainer.config import OptimizerConfig
    from tierflow.trainer.optim import build_optimizer

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt, sched = build_optimizer(model, OptimizerConfig(warmup_steps=2), 50)
    return model, opt, sched


def _train(model, opt, sched, steps, snap=None, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(4, 8, generator=g)
        loss = model(x).square().mean() + torch.rand(()) * 0  # draws from the global RNG too
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if snap is not None:
            snap.snapshot(s + 1)


def _snapshotter(store, model, opt, sched, tmp_path, **kw):
    s = Snapshotter(model=model, optimizer=opt, scheduler=sched, store=store, rank=0, world_size=1,
                    run_key="t" * 12, config_hash="h", holders=None, k=1, m=0, group=None,
                    persist_dir=tmp_path / "ck", **kw)
    opt.register_step_pre_hook(lambda *_: s.wait_safe())
    return s


def _restore(store, tmp_path, parts=None, verified=None):
    model, opt, sched = parts or _parts(seed=99)  # different weights: all must come from the snapshot
    snap = _snapshotter(store, model, opt, sched, tmp_path)
    if verified is not None:  # record which segments had their checksum checked
        check = snap.verify
        snap.verify = lambda h: verified.append(h.step) or check(h)
    res = restore_latest(snap, gather=lambda x: [x], broadcast=lambda x: x, persist_dir=tmp_path / "ck",
                         nodes=["n"])
    snap.close()
    return res, model, opt, sched


def _snapped(store_dir, tmp_path, steps):
    """A store on node "n" and one rank's model, optimizer, scheduler and snapshotter, trained
    ``steps`` steps with a snapshot after each, every copy finished."""
    store = StoreClient(store_dir, "n")
    model, opt, sched = _parts()
    snap = _snapshotter(store, model, opt, sched, tmp_path)
    _train(model, opt, sched, steps, snap)
    snap.drain()
    return store, model, opt, sched, snap


def _state(model, opt):
    return {**{k: v.clone() for k, v in model.state_dict().items()},
            **{f"{i}.{n}": v.clone() for i, st in opt.state_dict()["state"].items() for n, v in st.items()}}


def test_restore_from_memory_continues_bit_identically(tmp_path, snapshot_store_dir):
    store, model, opt, sched, snap = _snapped(snapshot_store_dir, tmp_path, 5)
    want = _state(model, opt)
    _train(model, opt, sched, 3, start=5)
    snap.close()
    verified = []
    res, model2, opt2, sched2 = _restore(store, tmp_path, verified=verified)
    assert (res.step, res.source) == (5, "memory")
    assert verified == [5]  # Note [verify what is chosen]: the older slot is not hashed
    # Restored state owns its memory: wiping the store's segments changes nothing.
    for name in store.names():
        store.open_existing(name).buf[:] = b"\0" * store.open_existing(name).size
    got = _state(model2, opt2)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert sched2.last_epoch == 5
    # The restored state trains on exactly as the original did from step 5.
    _train(model2, opt2, sched2, 3, start=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    store.close()


def test_restore_into_live_optimizer_state_overwrites_it_in_place(tmp_path, snapshot_store_dir):
    store, model, opt, sched, snap = _snapped(snapshot_store_dir, tmp_path, 4)
    want = _state(model, opt)
    _train(model, opt, sched, 2, start=4)  # the live state moves on
    snap.close()
    before = {id(v) for st in opt.state.values() for v in st.values()}
    res, *_ = _restore(store, tmp_path, parts=(model, opt, sched))
    assert res.step == 4
    got = _state(model, opt)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert {id(v) for st in opt.state.values() for v in st.values()} == before  # no new allocation
    store.close()


def test_corrupted_newest_snapshot_falls_back_to_the_older_one(tmp_path, snapshot_store_dir):
    store, model, opt, sched, snap = _snapped(snapshot_store_dir, tmp_path, 3)
    snap.close()
    newest = max((store.open_existing(n) for n in store.names()), key=lambda s: parse_header(s.buf).step)
    assert parse_header(newest.buf).step == 3
    newest.buf[HEADER_BYTES + 17] ^= 0x40  # one bit flips in the payload
    verified = []
    res, *_ = _restore(store, tmp_path, verified=verified)
    assert res.step == 2  # the checksum caught it; the double buffer's other slot is used
    assert verified == [3, 2]
    assert parse_header(newest.buf) is None  # discarded: never chosen again
    store.close()


def test_a_step_snapshotted_twice_restores_from_either_slot(tmp_path, snapshot_store_dir):
    """Checkpointer.finish() snapshots the last step again to persist it: both slots hold that step."""
    store, model, opt, sched, snap = _snapped(snapshot_store_dir, tmp_path, 2)
    snap.snapshot(2)
    snap.drain()
    snap.close()
    want = _state(model, opt)
    assert len(snap.holdings()) == 1
    res, model2, opt2, _ = _restore(store, tmp_path)
    got = _state(model2, opt2)
    assert res.step == 2 and all(torch.equal(want[k], got[k]) for k in want)
    store.close()


def test_a_corrupted_only_snapshot_is_discarded_and_the_next_start_is_fresh(tmp_path, snapshot_store_dir):
    """Note [restore while hashing]: the corrupted snapshot was already loaded when its checksum
    failed, and nothing older exists: the restore refuses to start from that state."""
    store, model, opt, sched, snap = _snapped(snapshot_store_dir, tmp_path, 1)
    snap.close()
    (only,) = [store.open_existing(n) for n in store.names() if parse_header(store.open_existing(n).buf)]
    only.buf[HEADER_BYTES + 3] ^= 0x01
    with pytest.raises(RuntimeError, match="failed its checksum after it was loaded.*begins from step 0"):
        _restore(store, tmp_path)
    res, *_ = _restore(store, tmp_path)
    assert res is None
    store.close()


def test_snapshot_torn_by_a_kill_mid_copy_is_never_restored(tmp_path, snapshot_store_dir):
    """A trainer SIGKILLed while copying snapshot 4 leaves that slot without its commit marker."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_checkpoint import _parts, _train, _snapshotter
        from tierflow.trainer.checkpoint.store import StoreClient
        store = StoreClient(Path({str(snapshot_store_dir)!r}), "n")
        model, opt, sched = _parts()
        def hook(step, i):
            if step == 4 and i == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        snap = _snapshotter(store, model, opt, sched, Path({str(tmp_path)!r}), copy_hook=hook)
        _train(model, opt, sched, 3, snap)
        snap.drain()
        torch.save({{k: v for k, v in model.state_dict().items()}}, {str(tmp_path / "step3.pt")!r})
        _train(model, opt, sched, 1, snap, start=3)
        snap.drain()
    """)
    proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = StoreClient(snapshot_store_dir, "n")
    steps = sorted(parse_header(store.open_existing(n).buf).step if parse_header(store.open_existing(n).buf)
                   else -1 for n in store.names())
    assert steps == [-1, 3]  # slot of step 4: no commit marker; step 3 intact
    res, model, _, _ = _restore(store, tmp_path)
    assert res.step == 3
    want = torch.load(tmp_path / "step3.pt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in want.items())
    store.close()


def test_store_outlives_its_client_and_stop_removes_segments(snapshot_store_dir):
    c = StoreClient(snapshot_store_dir, "n", idle_timeout_s=30)
    seg = c.segment("x", 8192)
    seg.buf[:4] = b"keep"
    assert oct(os.stat(seg.path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(snapshot_store_dir).st_mode & 0o777) == "0o700"
    c.close()
    c2 = StoreClient(snapshot_store_dir, "n", start=False)
    assert bytes(c2.open_existing(c2.prefix + "x").buf[:4]) == b"keep"
    path = seg.path
    c2.stop()
    assert not os.path.exists(path)


def test_restart_env_warns_only_for_torchrun_restarts_without_the_fix():
    from tierflow.trainer.checkpoint import check_restart_env

    assert check_restart_env({}) is None
    assert check_restart_env({"TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert check_restart_env({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}) is None
    msg = check_restart_env({"TORCHELASTIC_MAX_RESTARTS": "3"})
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in msg and "launch/torchrun.sh" in msg


def test_snapshot_copy_hashes_exactly_the_payload(tmp_path, snapshot_store_dir):
    """Note [copy in chunks]: the chunked copy's running hash equals a hash of the whole body, also
    for tensors larger than a chunk, empty ones, odd sizes and bfloat16."""
    from tierflow.trainer.checkpoint import snapshotter as snapshotter_mod
    from tierflow.trainer.checkpoint._state import Captured

    class Odd:
        def __init__(self):
            self.t = [torch.randn(3, 1000, 200), torch.empty(0), torch.arange(7, dtype=torch.int16),
                      torch.randn(333).to(torch.bfloat16), torch.randn(5, 4).t()]  # the last is not contiguous

        def capture(self, step, config_hash):
            return Captured(step, [(f"t{i}", t) for i, t in enumerate(self.t)], {"step": step, "rng": None})

        def apply(self, tensors, meta, *, rng):
            self.got = {k: v.clone() for k, v in tensors.items()}
            return meta["step"]

        def mutating_optimizers(self):
            return []

    store = StoreClient(snapshot_store_dir, "n")
    state = Odd()
    snap = Snapshotter(state=state, store=store, rank=0, world_size=1, run_key="o" * 12, config_hash="h",
                       holders=None, k=1, m=0, group=None, persist_dir=tmp_path)
    assert snapshotter_mod._CHUNK_BYTES < state.t[0].numel() * 4  # the big one is copied in several chunks
    snap.snapshot(1)
    snap.drain()
    (held,) = snap.holdings()
    assert snap.verify(held)
    res = restore_latest(snap, gather=lambda x: [x], broadcast=lambda x: x, persist_dir=tmp_path, nodes=["n"])
    assert res.step == 1 and all(torch.equal(state.got[f"t{i}"], t) for i, t in enumerate(state.t))
    snap.close()
    store.close()


@pytest.mark.cuda
def test_snapshot_of_device_state_restores_bit_identically(tmp_path, snapshot_store_dir):
    """The CUDA copy path: a side stream of the state's own device waits for the step's event there,
    then the host hashes the payload (Note [a stream per device]: on the last GPU, not device 0)."""
    store = StoreClient(snapshot_store_dir, "n")
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(device)
    model, _, _ = _parts()
    model.to(device)
    from tierflow.trainer.config import OptimizerConfig
    from tierflow.trainer.optim import build_optimizer

    opt, sched = build_optimizer(model, OptimizerConfig(warmup_steps=2), 50)
    snap = _snapshotter(store, model, opt, sched, tmp_path)
    for s in range(3):
        loss = model(torch.randn(4, 8, device=device)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        snap.snapshot(s + 1)
    snap.drain()
    assert set(snap._streams) == {device}
    want = _state(model, opt)
    snap.close()
    model2, _, _ = _parts(seed=99)
    model2.to(device)
    opt2, sched2 = build_optimizer(model2, OptimizerConfig(warmup_steps=2), 50)
    res, *_ = _restore(store, tmp_path, parts=(model2, opt2, sched2))
    got = _state(model2, opt2)
    assert res.step == 3 and all(torch.equal(want[k].cpu(), got[k].cpu()) for k in want)
    store.close()


def test_persisting_removes_copies_abandoned_by_a_crash(tmp_path):
    """A kill during persistence leaves a .tmp-step-N directory that is never restored from; the
    next save removes every such leftover, whatever its step."""
    from tierflow.trainer.checkpoint.persist import find_checkpoints, save_checkpoint

    for step in (3, 9):
        (tmp_path / f".tmp-step-{step:08d}").mkdir(parents=True)
        (tmp_path / f".tmp-step-{step:08d}" / "__0_0.distcp").write_bytes(b"partial")
    final = save_checkpoint(tmp_path, 5, {"model.w": torch.ones(4)}, {"rng": {}, "step": 5}, rank=0, world_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    assert find_checkpoints(tmp_path) == [(5, final)]
