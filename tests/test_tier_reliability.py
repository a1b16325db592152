"""5,000 random concurrent writes and reads across the host, NUMA and NVMe tiers, every byte checked."""

import random
import threading
import warnings

import torch

from tierflow.offload import (
    HostTierConfig,
    NumaTierConfig,
    NvmeTierConfig,
    SchedulerConfig,
    TierEngine,
    TierFullError,
    TiersConfig,
)

MiB = 1 << 20
NUM_THREADS = 4
OPS_PER_THREAD = 1250  # 5,000 operations in all
DTYPES = [torch.uint8, torch.float32, torch.int64, torch.bfloat16]


def _tensor(rng, gen):
    dtype = rng.choice(DTYPES)
    numel = rng.choice([1, rng.randint(1, 64), rng.randint(1, 4096), rng.randint(4096, 70_000)])
    if dtype == torch.uint8:
        return torch.randint(0, 256, (numel,), dtype=dtype, generator=gen)
    if dtype == torch.int64:
        return torch.randint(-2**62, 2**62, (numel,), dtype=dtype, generator=gen)
    return torch.randn(numel, generator=gen).to(dtype)


def _worker(engine, seed, stats, errors):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tiers = list(engine.tiers.values())
    live = []  # [tier, slot, expected tensor]
    pending = []  # (handle, out, expected) reads not yet checked
    try:
        for op in range(OPS_PER_THREAD):
            roll = rng.random()
            if not live or (roll < 0.35 and len(live) < 12):
                t = _tensor(rng, gen)
                tier = rng.choice(tiers)
                try:
                    slot = tier.reserve(t.nbytes)
                except TierFullError:
                    stats["full"] += 1
                    continue
                tier.write(slot, t)  # not waited: a read queued behind it must still see it
                live.append([tier, slot, t])
                stats["writes"] += 1
            elif roll < 0.5:  # overwrite a live slot with new content of the same size
                entry = rng.choice(live)
                t = torch.randint(0, 256, (entry[1].nbytes,), dtype=torch.uint8, generator=gen).view(entry[2].dtype)
                entry[0].write(entry[1], t)
                entry[2] = t
                stats["writes"] += 1
            elif roll < 0.9:
                tier, slot, expected = rng.choice(live)
                out = torch.empty(expected.shape, dtype=expected.dtype)
                pending.append((tier.read(slot, out), out, expected))
                stats["reads"] += 1
            else:
                tier, slot, expected = live.pop(rng.randrange(len(live)))
                tier.free(slot)
                stats["frees"] += 1
            if len(pending) > 16 or op == OPS_PER_THREAD - 1:
                for handle, out, expected in pending:
                    handle.wait(timeout=120)
                    if not torch.equal(out.view(torch.uint8), expected.view(torch.uint8)):
                        stats["mismatches"] += 1
                stats["verified"] += len(pending)
                pending.clear()
        for tier, slot, _ in live:
            tier.free(slot)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def test_5000_random_concurrent_transfers_across_tiers_have_zero_mismatches(tmp_path):
    dirs = [tmp_path / "ssd0", tmp_path / "ssd1"]
    for d in dirs:
        d.mkdir()
    cfg = TiersConfig(
        host=HostTierConfig(enabled=True, budget_bytes=16 * MiB, slab_bytes=2 * MiB),
        numa=NumaTierConfig(enabled=True, nodes=[0], budget_bytes=16 * MiB, slab_bytes=2 * MiB),
        nvme=NvmeTierConfig(enabled=True, dirs=[str(d) for d in dirs], chunk_bytes=64 * 1024, io_depth=3,
                            checksum="crc32", budget_bytes=64 * MiB),
        scheduler=SchedulerConfig(max_inflight_per_link=2),
    )
    stats = {k: 0 for k in ("writes", "reads", "frees", "verified", "mismatches", "full")}
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = TierEngine(cfg)
    with engine:
        threads = [threading.Thread(target=_worker, args=(engine, seed, stats, errors)) for seed in range(NUM_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors[0]
        assert all(tier.num_slots == 0 and tier.used_bytes == 0 for tier in engine.tiers.values())
        per_link = engine.scheduler.stats()
    assert stats["writes"] + stats["reads"] + stats["frees"] + stats["full"] == NUM_THREADS * OPS_PER_THREAD
    assert stats["verified"] == stats["reads"] > 1500
    assert stats["mismatches"] == 0
    assert {"host", "numa:0", "nvme:0", "nvme:1"} <= set(per_link)  # every tier and both disks carried traffic
