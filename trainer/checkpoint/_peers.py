"""Moving shards between ranks over a dedicated gloo group (point to point, no collectives).

Only the checkpoint's background thread uses this group while training runs, so its traffic
never queues behind (or in front of) the training's own all-reduces; at start-up the restore
path uses it from the main thread before any training traffic exists.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from tierflow.trainer.checkpoint._format import HEADER_BYTES, SnapshotHeader, parse_header

__all__ = ["exchange_shards", "send_recv"]

Buffer = Union[bytes, bytearray, memoryview]


def as_tensor(buf: Buffer) -> torch.Tensor:
    """A uint8 tensor over ``buf`` without copying (read-only buffers are only ever sent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": we never write to it
        return torch.frombuffer(buf, dtype=torch.uint8)


def send_recv(group: dist.ProcessGroup, sends: Sequence[Tuple[int, torch.Tensor]],
              recvs: Sequence[Tuple[int, torch.Tensor]]) -> None:
    """Post every send and receive at once and wait for all (ranks are global ranks)."""
    works = [dist.isend(t, dst, group=group) for dst, t in sends]
    works += [dist.irecv(t, src, group=group) for src, t in recvs]
    for w in works:
        w.wait()


def exchange_shards(group: dist.ProcessGroup, rank: int, holders: List[List[int]], headers: List[bytes],
                    shards: List[Buffer], target: Callable[[SnapshotHeader], torch.Tensor]) -> List[SnapshotHeader]:
    """Send this rank's shards 1.. to their holders; receive the shards this rank holds for others.

    Args:
        holders: ``holders[r][i]`` is the rank holding shard ``i`` of rank ``r`` (every rank's list).
        headers: this rank's packed shard headers (``HEADER_BYTES`` each), index = shard index.
        shards: this rank's shard bodies, index = shard index.
        target: gives the uint8 tensor a received shard (described by its header) is written into.

    Returns:
        The headers of the shards received (the caller commits them after the bodies landed).
    """
    sources = [(src, i) for src, hs in enumerate(holders) if src != rank for i, h in enumerate(hs) if h == rank and i > 0]
    sends = [(holders[rank][i], as_tensor(bytearray(headers[i].ljust(HEADER_BYTES, b"\0"))))
             for i in range(1, len(holders[rank]))]
    heads = [(src, torch.empty(HEADER_BYTES, dtype=torch.uint8)) for src, _ in sources]
    send_recv(group, sends, heads)
    received = []
    for src, t in heads:
        h = parse_header(t.numpy().tobytes())
        if h is None:
            raise AssertionError(f"rank {src} sent a shard header without its commit marker")
        received.append(h)
    bodies = [(holders[rank][i], as_tensor(shards[i])) for i in range(1, len(holders[rank]))]
    into = [(src, target(h)) for (src, _), h in zip(heads, received)]
    send_recv(group, bodies, into)
    return received


def fetch_shards(group: dist.ProcessGroup, rank: int, plan: Dict[int, List[Tuple[int, int, int]]],
                 read: Callable[[int, int], Buffer]) -> Dict[int, bytearray]:
    """Restore-time transfer: every ``(holder, shard index, length)`` in ``plan[rank]`` lands here.

    Args:
        plan: ``{needy rank: [(holder rank, shard index, shard length), ...]}``, the same on every rank.
        read: ``read(source rank, shard index)`` gives a shard this rank holds.

    Returns:
        ``{shard index: bytes}`` for this rank (empty when it needs nothing).
    """
    sends, recvs, out = [], [], {}
    for needy, items in plan.items():
        for holder, index, length in items:
            if holder == rank and needy != rank:
                sends.append((needy, as_tensor(read(needy, index))))
            if needy == rank:
                out[index] = bytearray(length)
                recvs.append((holder, torch.frombuffer(out[index], dtype=torch.uint8)))
    send_recv(group, sends, recvs)
    return out
