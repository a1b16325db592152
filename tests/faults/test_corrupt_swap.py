"""Issue 15 item 4: bytes changed in an NVMe swap file are never used.

Checksums are on by default (XXH3 per chunk). A chunk that fails is read once more (a bad
transfer passes then, with a warning); one that fails twice is a ``ChecksumError`` naming the
tier, the file and the offset, and the storage it was read into is put back empty, so no
parameter ever computes with those bytes. The trainer stops with one line (exit 1: an I/O error
a restart may cure), and the same command resumes from its last snapshot to the same result as
a run that was never corrupted.
"""

import os
import warnings

import pytest
import torch

from tierflow.offload import NvmeTier, NvmeTierConfig
from tierflow.offload.core.errors import ChecksumError
from tierflow.offload.runtime._residency import ABSENT, Residency
from tierflow.trainer import cli
from tierflow.trainer.compose import load_config
from tierflow.trainer.train import train


def _tier(tmp_path, **kw):
    swap = tmp_path / "swap"
    swap.mkdir(exist_ok=True)
    return NvmeTier(NvmeTierConfig(enabled=True, dirs=[str(swap)], chunk_bytes=64 << 10, **kw))


def _flip(tier, offset):
    """Flip one byte of the (only) swap file at ``offset``, behind the tier's back."""
    path = tier.swap_files[0]
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0x10]), offset)
    finally:
        os.close(fd)
    return path


def test_checksums_are_on_by_default():
    assert NvmeTierConfig().checksum == "xxh3"


def test_a_flipped_byte_is_an_error_naming_the_tier_file_and_offset(tmp_path):
    tier = _tier(tmp_path)
    try:
        src = torch.arange(100_000, dtype=torch.float32)
        slot = tier.reserve(src.numel() * 4)
        tier.write(slot, src.view(torch.uint8)).wait()
        path = _flip(tier, 70_000)  # inside the second 64 KiB chunk
        dst = torch.zeros_like(src)
        with pytest.raises(ChecksumError) as err:
            tier.read(slot, dst.view(torch.uint8)).wait()
        msg = str(err.value)
        assert msg.startswith("nvme tier: chunk 1 ") and path in msg and "offset 65536" in msg
        assert "fails its xxh3 checksum twice" in msg
    finally:
        tier.close()


def test_a_read_that_goes_wrong_once_is_read_again(tmp_path):
    tier = _tier(tmp_path)
    try:
        src = torch.randn(50_000)
        slot = tier.reserve(src.numel() * 4)
        tier.write(slot, src.view(torch.uint8)).wait()
        real_read, calls = tier._host_io.read, []

        def garbles_the_first_read(ctx, file, buf, offset):
            real_read(ctx, file, buf, offset)
            calls.append(offset)
            if len(calls) == 1:
                buf.view(torch.uint8)[7] ^= 1

        tier._host_io.read = garbles_the_first_read
        dst = torch.zeros_like(src)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tier.read(slot, dst.view(torch.uint8)).wait()
        assert torch.equal(dst, src)
        assert any("passed when read again" in str(w.message) for w in seen)
    finally:
        tier.close()


def test_a_parameter_never_holds_bytes_that_failed(tmp_path):
    tier = _tier(tmp_path)
    try:
        table = Residency(lambda name: tier)
        weight = torch.nn.Parameter(torch.randn(64, 256))
        storage = weight.untyped_storage()
        assert table.offload("w", storage, "nvme")
        table.release("w")
        assert storage.nbytes() == 0
        _flip(tier, 100)
        with pytest.raises(ChecksumError):
            table.arrive("w")
        assert storage.nbytes() == 0 and table.entries["w"].state == ABSENT  # away, as before the read
        with pytest.raises(ChecksumError):  # and it stays an error, every time
            table.arrive("w")
    finally:
        tier.close()


def _overrides(tmp_path, store_dir, swap, marker):
    return ["logging=none", "logging.progress=false", "logging.plot=false", f"logging.run_root={tmp_path / 'runs'}",
            "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.steps=8", "trainer.global_batch=8",
            "model._target_=tests._faults.CorruptSwapOnceLM", f"+model.kwargs.swap_dir={swap}",
            f"+model.kwargs.marker={marker}", "+model.kwargs.corrupt_at_call=6",
            "offload=none", "optimizer.tiered.enabled=true", "optimizer.tiered.paths=[nvme]",
            "optimizer.tiered.subgroup_bytes=65536", "tiers.nvme.enabled=true", f"tiers.nvme.dirs=[{swap}]",
            "checkpoint=memory", "checkpoint.every_steps=1", "checkpoint.parity_shards=0",
            "checkpoint.persist_on_finish=false", f"checkpoint.store_dir={store_dir}"]


def test_the_trainer_stops_in_one_line_and_the_same_command_resumes_exactly(tmp_path, snapshot_store_dir, capsys):
    swap = tmp_path / "swap"
    swap.mkdir()
    never = tmp_path / "already-corrupted"
    never.touch()  # the reference run: the marker says "done", so nothing is corrupted
    reference = train(load_config(_overrides(tmp_path / "ref", snapshot_store_dir, swap, never))[0])

    marker = tmp_path / "corrupted"
    args = _overrides(tmp_path, snapshot_store_dir, swap, marker)
    assert cli.main(["train", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert marker.exists() and len(err) == 1, err
    assert err[0].startswith("tierflow: error: TieredStepError: tiered optimizer step 6 failed: nvme tier: chunk ")
    assert str(swap) in err[0] and err[0].endswith("parameters and optimizer state are unchanged (as after the "
                                                   "previous step)")
    again = train(load_config(args)[0])  # the same command: resumes from the last good snapshot
    assert 0 < again.summary["resumed_from_step"] < 8
    assert again.summary["param_digests"] == reference.summary["param_digests"]
    assert again.summary["final_val_loss"] == reference.summary["final_val_loss"]


def test_parameters_waiting_on_nvme_that_fail_stop_the_run_in_one_line(tmp_path, capsys):
    """The runtime's path (parameters paged by the plan, no tiered optimizer): the same one line,
    and no second error or divergence warning from the hooks that run while it propagates."""
    swap = tmp_path / "swap"
    swap.mkdir()
    args = [a for a in _overrides(tmp_path, tmp_path / "unused", swap, tmp_path / "corrupted")
            if not a.startswith(("checkpoint", "optimizer.tiered", "offload="))]
    assert cli.main(["train", *args, "offload=zero_infinity"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tierflow: error: ChecksumError: nvme tier: chunk "), err
