"""The .tftrace file: exact round trips (also at 100k tensors), owner-only files, clear errors."""

import json
import stat
import struct

import pytest
import torch
import torch.nn.functional as F

from tierflow.profiling import (
    FORMAT_VERSION,
    Category,
    LifetimeTrace,
    Phase,
    Point,
    PointKind,
    TensorRecord,
    TraceFileError,
    load_trace,
    save_trace,
    trace_iterations,
)
from tierflow.trainer.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def gpt_trace():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=32))
    opt = torch.optim.AdamW(model.parameters())

    def step(i):
        w = torch.randint(64, (2, 17))
        F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    step(0)
    return trace_iterations(model, opt, step, num_iterations=2)


def test_round_trip_is_exact_and_owner_only(tmp_path, gpt_trace):
    path = save_trace(gpt_trace, tmp_path / "trace.tftrace")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_trace(path) == gpt_trace
    assert [p.name for p in tmp_path.iterdir()] == ["trace.tftrace"]  # no temporary file left


def _synthetic(num_tensors):
    """A valid trace of one iteration with ``num_tensors`` records, each born, used and freed."""
    n_points = 1000
    points = tuple(Point(PointKind.FORWARD_PRE if 0 < i < n_points - 1 else
                         (PointKind.ITERATION_START if i == 0 else PointKind.ITERATION_END),
                         f"blocks.{i % 48}.mlp", i // 48, 0, Phase.FORWARD, 1e-4 * (i % 7), 10 * num_tensors * i)
                   for i in range(n_points))
    tensors = []
    for j in range(num_tensors):
        born = 1 + j % (n_points - 10)
        tensors.append(TensorRecord(
            key=f"blocks.{j % 48}.attn[{j // 48}]:saved{j % 5}", category=Category.ACTIVATION,
            size_bytes=4096 + j, dtype="bfloat16" if j % 3 else "float32", device="cpu", iteration=0, created=born,
            freed=born + 5, uses=(born + 1, born + 3), created_tick=points[born].tick + 1 + j,
            freed_tick=points[born + 5].tick + 1 + j))
    return LifetimeTrace(points=points, tensors=tuple(tensors), num_iterations=1, model="Big", optimizer="AdamW")


def test_a_100k_tensor_trace_round_trips(tmp_path):
    trace = _synthetic(100_000)
    path = save_trace(trace, tmp_path / "big.tftrace")
    assert load_trace(path) == trace
    assert path.stat().st_size < 10 * 2**20  # compact: ~100 bytes of columns per tensor before compression


def _rewrite_header(path, **changes):
    blob = path.read_bytes()
    (n,) = struct.unpack_from("<I", blob, 8)
    header = json.loads(blob[12:12 + n])
    header.update(changes)
    head = json.dumps(header).encode()
    path.write_bytes(blob[:8] + struct.pack("<I", len(head)) + head + blob[12 + n:])


def test_another_format_version_is_refused_with_what_to_do(tmp_path, gpt_trace):
    path = save_trace(gpt_trace, tmp_path / "t.tftrace")
    _rewrite_header(path, version=FORMAT_VERSION + 1)
    with pytest.raises(TraceFileError, match=f"version {FORMAT_VERSION + 1}; this tierflow reads version "
                                             f"{FORMAT_VERSION}: re-run `tierflow profile`"):
        load_trace(path)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:-40] + bytes([b[-40] ^ 0xFF]) + b[-39:], "checksum mismatch"),
    (lambda b: b[:20], "truncated header"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a tierflow trace file"),
    (lambda b: b[:12] + b"#" + b[13:], "unreadable header"),
])
def test_a_damaged_file_gives_one_clear_line(tmp_path, gpt_trace, damage, message):
    path = save_trace(gpt_trace, tmp_path / "t.tftrace")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(TraceFileError, match=message) as info:
        load_trace(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(TraceFileError, match="does not exist; run `tierflow profile` first"):
        load_trace(tmp_path / "nope.tftrace")
    with pytest.raises(TraceFileError, match="is a directory"):
        load_trace(tmp_path)


def test_an_inconsistent_trace_is_not_saved(tmp_path, gpt_trace):
    bad = LifetimeTrace(points=gpt_trace.points[::-1], tensors=gpt_trace.tensors, num_iterations=2)
    with pytest.raises(ValueError, match="refusing to save an inconsistent trace"):
        save_trace(bad, tmp_path / "t.tftrace")
    with pytest.raises(ValueError, match="does not exist; create it first"):
        save_trace(gpt_trace, tmp_path / "missing" / "t.tftrace")
