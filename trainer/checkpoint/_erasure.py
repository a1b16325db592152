"""Spreading one rank's snapshot over other nodes: placement and erasure coding (pure functions).

A rank's snapshot body is cut into ``k`` equal data shards and ``m`` parity shards are computed
with zfec (a Reed-Solomon code over GF(2^8): any ``k`` of the ``k + m`` shards give the body
back). Shard 0 stays with the rank itself (it is a slice of the rank's full local copy); shards
1..k+m-1 go to ranks on *other* nodes, one node each, so losing any ``m`` nodes' memory still
leaves ``k`` shards of every rank. ``k = 1`` is plain replication: every shard is the whole body
and zfec is not needed.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

__all__ = ["decode_body", "encode_body", "shard_holders", "shard_len"]

Buffer = Union[bytes, bytearray, memoryview]


def shard_holders(rank: int, nodes: Sequence[str], k: int, m: int) -> List[int]:
    """The ranks holding shards ``0..k+m-1`` of ``rank``'s snapshot; shard 0 is ``rank`` itself.

    The others are the next ranks in ring order that sit on a node not used yet, so no node holds
    two shards of one snapshot.

    Args:
        rank: the rank whose snapshot is spread.
        nodes: the node id of every rank, in rank order.
        k: data shards; m: parity shards.

    Raises:
        ValueError: fewer than ``k + m`` distinct nodes.

    Example:
        >>> shard_holders(1, ["a", "b", "c"], 2, 1)
        [1, 2, 0]
    """
    world = len(nodes)
    out, used = [rank], {nodes[rank]}
    for d in range(1, world):
        if len(out) == k + m:
            break
        r = (rank + d) % world
        if nodes[r] not in used:
            out.append(r)
            used.add(nodes[r])
    if len(out) < k + m:
        raise ValueError(f"checkpoint.data_shards + checkpoint.parity_shards = {k}+{m} needs {k + m} distinct "
                         f"nodes, but the {world} ranks sit on {len(set(nodes))}; lower data_shards/parity_shards "
                         "or give ranks their own checkpoint.node_id")
    return out


def shard_len(body_len: int, k: int) -> int:
    return -(-body_len // k)


def encode_body(body: Buffer, k: int, m: int) -> List[Buffer]:
    """The ``k + m`` shards of ``body`` (data shards are zero-copy slices where possible)."""
    view = memoryview(body).cast("B")
    if k == 1:
        return [view] * (1 + m)
    n = shard_len(len(view), k)
    blocks: List[Buffer] = [view[i * n:(i + 1) * n] for i in range(k)]
    if len(blocks[-1]) < n:  # zfec needs equal blocks: pad the last one with zeros
        blocks[-1] = bytes(blocks[-1]) + b"\0" * (n - len(blocks[-1]))
    for i in range(k):
        if len(blocks[i]) == 0:
            blocks[i] = b"\0" * n
    if m == 0:
        return blocks
    # zfec is needed only with parity shards (checkpoint.parity_shards > 0).
    import zfec

    return list(zfec.Encoder(k, k + m).encode(blocks))


def decode_body(shards: Dict[int, Buffer], k: int, m: int, body_len: int) -> bytes:
    """The body back from any ``k`` of its shards (``{shard index: bytes}``).

    Raises:
        ValueError: fewer than ``k`` distinct shards.
    """
    if len(shards) < k:
        raise ValueError(f"{len(shards)} shard(s) {sorted(shards)} cannot rebuild a body coded {k}+{m}; "
                         f"need {k}")
    if k == 1:
        return bytes(memoryview(next(iter(shards.values()))).cast("B")[:body_len])
    nums = sorted(shards)[:k]
    if nums == list(range(k)):
        data = [shards[i] for i in nums]
    else:
        # zfec is needed only with parity shards (checkpoint.parity_shards > 0).
        import zfec

        data = zfec.Decoder(k, k + m).decode([bytes(memoryview(shards[i]).cast("B")) for i in nums], nums)
    return b"".join(bytes(d) for d in data)[:body_len]
