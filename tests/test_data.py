"""Synthetic language and token-file sources: determinism, sharding, splits, bad files."""

import math

import numpy as np
import pytest
import torch

from tierflow.trainer.config import ConfigError, DataConfig
from tierflow.trainer.data import ShardedLoader, SyntheticMarkov, TokenFile


def _synthetic(**kw):
    return SyntheticMarkov(DataConfig(**{"vocab_size": 64, "seq_len": 32, "branching": 3, **kw}), seed=7)


def test_synthetic_batches_are_a_pure_function_of_seed_split_and_step():
    a, b = _synthetic(), _synthetic()
    assert torch.equal(a.global_batch("train", 5, 8), b.global_batch("train", 5, 8))
    assert not torch.equal(a.global_batch("train", 5, 8), a.global_batch("train", 6, 8))
    assert not torch.equal(a.global_batch("train", 5, 8), a.global_batch("val", 5, 8))
    other = SyntheticMarkov(DataConfig(vocab_size=64, seq_len=32, branching=3), seed=8)
    assert not torch.equal(a.global_batch("train", 5, 8), other.global_batch("train", 5, 8))


def test_synthetic_sequences_follow_the_transition_table():
    src = _synthetic()
    rows = src.global_batch("train", 0, 64)
    assert rows.shape == (64, 33) and rows.dtype == torch.long
    allowed = {(a, b) for a in range(64) for b in src.successors[a].tolist()}
    pairs = set(zip(rows[:, :-1].flatten().tolist(), rows[:, 1:].flatten().tolist()))
    assert pairs <= allowed
    assert all(len(set(r.tolist())) == 3 for r in src.successors)  # distinct successors


def test_synthetic_loss_floor_matches_empirical_entropy():
    src = _synthetic()
    assert 0.0 < src.entropy_floor < math.log(3) < math.log(64)
    # Negative log-likelihood of sampled data under the true table ~= the floor.
    rows = src.global_batch("train", 1, 4096)
    prev, nxt = rows[:, :-1].flatten(), rows[:, 1:].flatten()
    idx = (src.successors[prev] == nxt[:, None]).float().argmax(dim=1)
    nll = -src.probs[prev, idx].log().mean().item()
    assert abs(nll - src.entropy_floor) < 0.02


def test_shards_and_micro_batches_partition_the_global_batch():
    src = _synthetic()
    full = src.global_batch("train", 3, 16)
    pieces = []
    for rank in range(2):
        loader = ShardedLoader(src, global_batch=16, grad_accum=2, rank=rank, world_size=2, device=torch.device("cpu"))
        for inputs, targets in loader.micro_batches(3):
            assert inputs.shape == (4, 32) and torch.equal(inputs[:, 1:], targets[:, :-1])
            pieces.append(torch.cat([inputs, targets[:, -1:]], dim=1))
    got = torch.cat(pieces)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, full.tolist()))


def _write_tokens(path, n, dtype=np.uint16, high=100):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, high, size=n).astype(dtype)
    arr.tofile(path)
    return arr


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows_come_from_their_split(tmp_path, dtype):
    path = tmp_path / "tokens.bin"
    arr = _write_tokens(path, 2000, np.dtype(dtype), high=70000 if dtype == "uint32" else 100)
    vocab = 70000 if dtype == "uint32" else 100
    src = TokenFile(DataConfig(kind="tokens", path=str(path), dtype=dtype, vocab_size=vocab, seq_len=16,
                               val_fraction=0.1), seed=0)
    assert src.bounds == {"train": (0, 1800), "val": (1800, 2000)}
    windows = src.global_batch("train", 0, 32)
    assert windows.shape == (32, 17)
    text = arr.astype(np.int64)
    for w in windows.numpy():
        starts = [s for s in range(0, 1800 - 16) if np.array_equal(text[s : s + 17], w)]
        assert starts, "window is not a contiguous slice of the train split"
    val = src.global_batch("val", 0, 8).numpy()
    for w in val:
        assert any(np.array_equal(text[s : s + 17], w) for s in range(1800, 2000 - 16))


def test_token_file_errors(tmp_path):
    cfg = dict(kind="tokens", vocab_size=100, seq_len=16)
    with pytest.raises(ConfigError, match="does not exist"):
        TokenFile(DataConfig(path=str(tmp_path / "missing.bin"), **cfg), seed=0)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ConfigError, match="not a whole number of uint16 tokens"):
        TokenFile(DataConfig(path=str(odd), **cfg), seed=0)
    short = tmp_path / "short.bin"
    _write_tokens(short, 30)
    with pytest.raises(ConfigError, match="fewer than data.seq_len\\+1=17"):
        TokenFile(DataConfig(path=str(short), **cfg), seed=0)
    big = tmp_path / "big.bin"
    _write_tokens(big, 500, high=200)
    # Found when the file is opened (before any work), not at the batch that happens to hold the id.
    with pytest.raises(ConfigError, match="set data.vocab_size to at least"):
        TokenFile(DataConfig(path=str(big), **cfg), seed=0)
