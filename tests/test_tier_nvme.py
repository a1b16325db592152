"""The nvme tier on real files: striping, O_DIRECT, permissions, bad directories, full disks, checksums."""

import os
import stat
import subprocess
import warnings

import pytest
import torch

from tests.helpers import disk_fills_at
from tierflow.offload import (
    ChecksumError,
    NvmeTier,
    NvmeTierConfig,
    TierConfigError,
    TierFullError,
    TierIOError,
    aligned_empty,
)
from tierflow.offload.tiers import nvme as nvme_module

KiB, MiB = 1 << 10, 1 << 20


def _dirs(tmp_path, n):
    out = []
    for i in range(n):
        d = tmp_path / f"ssd{i}"
        d.mkdir(parents=True)
        out.append(str(d))
    return out


def _cfg(dirs, **kw):
    kw.setdefault("chunk_bytes", 64 * KiB)
    return NvmeTierConfig(enabled=True, dirs=dirs, **kw)


def _roundtrip(tier, t):
    slot = tier.reserve(t.nbytes)
    tier.write(slot, t).wait()
    out = torch.empty(t.shape, dtype=t.dtype)
    tier.read(slot, out).wait()
    return slot, out


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 64 * KiB, 64 * KiB + 1, 300_000, 2 * MiB + 12])
def test_round_trip_of_any_size_striped_over_two_directories(tmp_path, nbytes):
    with NvmeTier(_cfg(_dirs(tmp_path, 2), checksum="crc32")) as tier:
        t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        _, out = _roundtrip(tier, t)
        assert torch.equal(out, t)


def test_page_aligned_tensors_take_the_in_place_path_and_round_trip(tmp_path):
    with NvmeTier(_cfg(_dirs(tmp_path, 1))) as tier:
        src = aligned_empty(MiB, torch.float32)
        src.copy_(torch.randn(MiB // 4))
        slot = tier.reserve(src.nbytes)
        tier.write(slot, src).wait()
        out = aligned_empty(MiB, torch.float32)
        tier.read(slot, out).wait()
        assert torch.equal(out, src)


def test_chunks_are_dealt_over_both_directories(tmp_path):
    dirs = _dirs(tmp_path, 2)
    with NvmeTier(_cfg(dirs)) as tier:
        t = torch.randint(0, 256, (8 * 64 * KiB,), dtype=torch.uint8)
        _roundtrip(tier, t)
        sizes = [os.stat(f).st_size for f in tier.swap_files]
        assert sizes == [4 * 64 * KiB, 4 * 64 * KiB]  # eight chunks, four on each disk
        with open(tier.swap_files[0], "rb") as f0, open(tier.swap_files[1], "rb") as f1:
            a, b = f0.read(64 * KiB), f1.read(64 * KiB)
        assert a == t[:64 * KiB].numpy().tobytes() and b == t[64 * KiB:128 * KiB].numpy().tobytes()


def test_swap_files_are_owner_only_and_removed_at_close(tmp_path):
    dirs = _dirs(tmp_path, 2)
    tier = NvmeTier(_cfg(dirs))
    for private, f in zip(tier.directories, tier.swap_files):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    _roundtrip(tier, torch.randn(1000))
    tier.close()
    assert all(os.listdir(d) == [] for d in dirs)


def test_keep_files_leaves_swap_files_for_inspection(tmp_path):
    dirs = _dirs(tmp_path, 1)
    with NvmeTier(_cfg(dirs, keep_files=True)) as tier:
        _roundtrip(tier, torch.randn(1000))
        kept = tier.swap_files[0]
    assert os.path.isfile(kept)


def test_missing_and_unwritable_directories_are_all_reported_before_any_work(tmp_path):
    good = _dirs(tmp_path, 1)[0]
    missing = str(tmp_path / "nope")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permissions: make it a read-only filesystem instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                                 capture_output=True).returncode == 0
    if not mounted:
        readonly.chmod(0o500)
    try:
        with pytest.raises(TierConfigError) as err:
            NvmeTier(_cfg([good, missing, str(readonly)]))
        msg = str(err.value)
        assert f"tiers.nvme.dirs[1]={missing} does not exist; create it" in msg
        assert f"tiers.nvme.dirs[2]={readonly} is not writable" in msg
        assert os.listdir(good) == []  # nothing left behind in the good one
    finally:
        if mounted:
            subprocess.run(["umount", str(readonly)], check=True)
        readonly.chmod(0o700)


def test_direct_io_required_but_unsupported_is_refused_and_auto_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(nvme_module, "probe_direct_io", lambda d: "Invalid argument")
    with pytest.raises(TierConfigError, match=r"does not support O_DIRECT .* tiers.nvme.direct=auto"):
        NvmeTier(_cfg(_dirs(tmp_path, 1), direct="on"))
    with pytest.warns(UserWarning, match="buffered I/O"):
        tier = NvmeTier(_cfg([str(tmp_path)], direct="auto"))
    with tier:
        t = torch.randn(12345)
        _, out = _roundtrip(tier, t)
        assert torch.equal(out, t) and not tier._dirs[0].file.direct


def _fill_until_full(tier, size):
    written = []
    with pytest.raises(TierFullError) as err:
        for i in range(10_000):
            t = torch.full((size // 4,), float(i))
            slot = tier.reserve(t.nbytes)
            tier.write(slot, t).wait()
            written.append((slot, t))
    return written, str(err.value)


def test_a_full_disk_is_found_at_reserve_and_earlier_slots_stay_readable(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_write_failure_... covers this with fault injection")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mount is not permitted here; the fault-injection test covers a full disk")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older kernels: tmpfs has no O_DIRECT (buffered fallback)
            tier = NvmeTier(_cfg([str(small)], budget_bytes=64 * MiB))
        with tier:
            written, msg = _fill_until_full(tier, 512 * KiB)
            assert "out of disk space" in msg and str(small) in msg and "tiers.nvme.dirs" in msg
            assert len(written) >= 4
            for slot, t in written:
                out = torch.empty_like(t)
                tier.read(slot, out).wait()
                assert torch.equal(out, t)
            tier.free(written[0][0])  # space comes back: the disk is usable again
            slot = tier.reserve(512 * KiB)
            tier.write(slot, torch.ones(128 * KiB)).wait()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_write_failure_mid_transfer_gives_a_clear_error_and_keeps_other_slots(tmp_path):
    io = disk_fills_at(4)
    with NvmeTier(_cfg(_dirs(tmp_path, 2), preallocate=False), raw_io=io) as tier:
        good = []
        for i in range(3):
            t = torch.full((16 * KiB,), float(i))  # one 64 KiB chunk each
            slot = tier.reserve(t.nbytes)
            tier.write(slot, t).wait()
            good.append((slot, t))
        bad = tier.reserve(64 * KiB)
        with pytest.raises(TierIOError, match=r"write of chunk 0 .* No space left on device; free space in .* tiers.nvme.dirs"):
            tier.write(bad, torch.zeros(16 * KiB)).wait()
        with pytest.raises(TierIOError, match="holds no valid data: its last write failed"):
            tier.read(bad, torch.empty(16 * KiB)).wait()
        for slot, t in good:
            out = torch.empty_like(t)
            tier.read(slot, out).wait()
            assert torch.equal(out, t)


def test_budget_error_names_the_setting(tmp_path):
    with NvmeTier(_cfg(_dirs(tmp_path, 1), budget_bytes=MiB)) as tier:
        tier.reserve(MiB)
        with pytest.raises(TierFullError, match=r"its budget 1.0 MiB \(tiers.nvme.budget_bytes=1048576\); raise tiers.nvme.budget_bytes"):
            tier.reserve(1)


def test_corrupted_swap_file_is_detected_with_checksums(tmp_path):
    for kind in ("crc32", "xxh3"):
        with NvmeTier(_cfg(_dirs(tmp_path / kind, 1), checksum=kind)) as tier:
            t = torch.randn(50_000)
            slot, out = _roundtrip(tier, t)
            assert torch.equal(out, t)
            with open(tier.swap_files[0], "r+b") as f:  # flip one byte behind the tier's back
                f.seek(70_000)
                byte = f.read(1)
                f.seek(70_000)
                f.write(bytes([byte[0] ^ 0xFF]))
                f.flush()
                os.fsync(f.fileno())
            with pytest.raises(ChecksumError, match=f"chunk 1 .* fails its {kind} checksum"):
                tier.read(slot, torch.empty_like(t)).wait()


def test_deepspeed_aio_backend_round_trips_or_says_why_not(tmp_path):
    try:
        tier = NvmeTier(_cfg(_dirs(tmp_path, 2), backend="deepspeed_aio"))
    except TierIOError as exc:  # deepspeed missing or its op does not build here (libaio-dev absent)
        assert "tiers.nvme.backend=deepspeed_aio is not available" in str(exc)
        pytest.skip(f"DeepSpeed's async I/O is not available here, so only its error was checked: {exc}")
    with tier:
        for n in (5, 64 * KiB, 200_000):
            t = torch.randint(0, 256, (n,), dtype=torch.uint8)
            _, out = _roundtrip(tier, t)
            assert torch.equal(out, t)


def test_config_problems_are_reported_together():
    with pytest.raises(TierConfigError) as err:
        NvmeTierConfig(enabled=True, dirs=[], chunk_bytes=1000, io_depth=0, direct="maybe", checksum="md5")
    msg = str(err.value)
    for part in ("tiers.nvme.dirs is empty", "chunk_bytes=1000 must be a positive multiple of 4096",
                 "io_depth=0", "direct='maybe'", "checksum='md5'"):
        assert part in msg
