"""Recovery on start: find the newest snapshot every rank can have, then restore it.

Deciding is pure (:func:`choose_restore`, tested on hand-built holdings): a step is restorable
from memory when *every* rank either holds its own committed FULL snapshot of that step or can
gather ``k`` committed shards of it from peers; local memory is preferred, then peers, then the
newest complete disk checkpoint; a newer disk checkpoint beats an older memory snapshot. Every
rank computes the same choice from the same gathered holdings, so they agree without a vote.

Note [verify what is chosen]: checksums are checked only for the segments the choice uses (each
rank its own FULL snapshot and the shards it sends), not for every slot held. A segment that fails
is reported to all ranks, dropped from the holdings, and the choice made again, so a corrupted
newest snapshot falls back to the older slot (or the peers, or disk) on every rank alike.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tierflow.trainer.checkpoint._erasure import decode_body
from tierflow.trainer.checkpoint._format import FULL, SHARD, checksum
from tierflow.trainer.checkpoint._peers import fetch_shards
from tierflow.trainer.checkpoint._state import meta_from_bytes, views_from_payload
from tierflow.trainer.checkpoint.persist import load_checkpoint, newest_verified
from tierflow.trainer.checkpoint.snapshotter import Holding, Snapshotter

__all__ = ["RestorePlan", "RestoreResult", "choose_restore", "restore_latest"]


@dataclass(frozen=True)
class RestorePlan:
    """Where each rank's state comes from. ``source`` is ``memory``, ``disk`` or ``none``."""

    source: str
    step: int = 0
    local: Tuple[int, ...] = ()
    # needy rank -> ((holder, shard index, shard length), ...): k shards to decode from
    from_peers: Dict[int, Tuple[Tuple[int, int, int], ...]] = field(default_factory=dict)
    disk_path: Optional[str] = None


@dataclass(frozen=True)
class RestoreResult:
    step: int
    source: str
    seconds: float
    detail: str
    note: Dict[str, Any] = field(default_factory=dict)  # what ``snapshot(note=...)`` kept (the last loss)


def choose_restore(holdings: Sequence[Holding], world_size: int, disk: Sequence[Tuple[int, str]] = ()) -> RestorePlan:
    """The newest step every rank can restore (see the module docstring).

    Args:
        holdings: every rank's verified segments of this run and world size.
        disk: complete disk checkpoints as ``(step, path)``.

    Example:
        >>> h = [Holding(r, r, 4, 0, 0, 10, 10, 1, 1, 0) for r in range(2)]
        >>> choose_restore(h, 2).step
        4
    """
    steps = sorted({h.step for h in holdings}, reverse=True)
    best_disk = max(disk, default=None)
    for step in steps:
        if best_disk is not None and best_disk[0] > step:
            break
        local, peers, ok = [], {}, True
        for r in range(world_size):
            if any(h.kind == FULL and h.src == r and h.holder == r and h.step == step for h in holdings):
                local.append(r)
                continue
            shards: Dict[int, Holding] = {}
            for h in sorted(holdings, key=lambda h: (h.shard_index, h.holder)):
                if h.kind == SHARD and h.src == r and h.step == step and h.holder != r:
                    shards.setdefault(h.shard_index, h)
            k = min((h.k for h in shards.values()), default=1)
            if len(shards) < k or not shards:
                ok = False
                break
            peers[r] = tuple((h.holder, h.shard_index, h.body_len) for h in list(shards.values())[:k])
        if ok:
            return RestorePlan("memory", step, tuple(local), peers)
    if best_disk is not None:
        return RestorePlan("disk", best_disk[0], disk_path=str(best_disk[1]))
    return RestorePlan("none")


def restore_latest(snap: Snapshotter, *, gather: Any, broadcast: Any, persist_dir: Path, nodes: Sequence[str],
                   restore: str = "auto") -> Optional[RestoreResult]:
    """Restore the newest snapshot into the snapshotter's model/optimizer/scheduler (collective).

    Args:
        gather/broadcast: the runtime's object collectives (``Runtime.gather``/``Runtime.broadcast``).
        nodes: node id of every rank (for the log line).
        restore: ``auto`` (memory, then disk), ``memory``, ``disk`` or ``none``.

    Returns:
        What was restored, or None when training starts fresh.
    """
    if restore == "none":
        return None
    t0 = time.perf_counter()
    mine = snap.holdings() if restore in ("auto", "memory") else []
    holdings = [h for per_rank in gather(mine) for h in per_rank]
    # Rank 0 verifies the newest persisted copy (Note [verify before parsing]); every rank loads it.
    disk = broadcast([(s, str(p)) for s, p in newest_verified(persist_dir)] if snap.rank == 0 else None) \
        if restore in ("auto", "disk") else []
    dirty = False  # some rank's live state holds a snapshot that failed its checksum
    while True:  # Note [verify what is chosen]
        plan = choose_restore(holdings, snap.world_size, disk)
        if plan.source != "memory":
            break
        step, bad, torn, applied_bad = _from_memory(snap, plan, holdings)
        reports = gather((bad, applied_bad))
        all_bad = {h for per_rank, _ in reports for h in per_rank}
        dirty = dirty or any(d for _, d in reports)
        if not all_bad:
            if torn:
                raise AssertionError(f"rank {snap.rank}: the snapshot rebuilt from peers fails its checksum, "
                                     "but every shard sent passed its own")
            return RestoreResult(step, "memory", time.perf_counter() - t0, _detail(plan, snap.rank, nodes),
                                 dict(snap.restored_note))
        for h in bad:
            snap.discard(h)  # never chosen again, by this start or the next
        holdings = [h for h in holdings if h not in all_bad]
    if plan.source == "none":
        if dirty:
            raise RuntimeError("the only complete snapshot in memory failed its checksum after it was loaded, and "
                               "no older one or disk checkpoint exists; it has been discarded: start again "
                               "(torchrun --max-restarts does so) and training begins from step 0")
        return None
    tensors, meta = load_checkpoint(Path(plan.disk_path), snap.rank)
    if meta.get("config_hash") != snap.config_hash:
        warnings.warn(f"the checkpoint {plan.disk_path} was written with another configuration; restoring it "
                      "anyway (model and optimizer shapes must match)", stacklevel=2)
    step = snap.state.apply(tensors, meta, rng=meta["rng"])
    return RestoreResult(step, "disk", time.perf_counter() - t0, f"from disk {plan.disk_path}",
                         dict(meta.get("note") or {}))


def _from_memory(snap: Snapshotter, plan: RestorePlan, holdings: Sequence[Holding]):
    """Apply ``plan`` on this rank.

    Returns:
        (step or None, held segments that failed their checksum, whether the body rebuilt from peers
        failed its checksum, whether a failing snapshot was (partly) applied to the live state).

    Note [restore while hashing]: the rank's own snapshot is hashed on a second thread while it is
    copied into the live state (both release the GIL), so verifying costs no extra time. A
    mismatch is only known afterwards: the state then holds garbage, which is fine, because every
    rank learns of it and the next choice overwrites all of it. Shards are hashed before they are
    sent, so a receiver never decodes a bad one unknowingly.
    """
    rank = snap.rank
    used = _used_by(plan, holdings, rank)
    bad = [h for h in used if h.kind == SHARD and not snap.verify(h)]
    peer_plan = {r: list(v) for r, v in plan.from_peers.items()}
    shards = fetch_shards(snap.group, rank, peer_plan, lambda src, i: snap.read(src, plan.step, SHARD, i)[0]) \
        if peer_plan else {}
    if rank not in plan.local:
        holder = next(h for h in holdings if h.src == rank and h.step == plan.step and h.kind == SHARD)
        body = memoryview(bytearray(decode_body(shards, holder.k, holder.m, holder.image_len)))
        if checksum(body) != holder.image_hash:
            return None, bad, True, False
        return _apply_body(snap, body, holder.payload_len, holder.meta_len), bad, False, False
    own = next(h for h in used if h.kind == FULL)
    try:
        body, header = snap.read(rank, plan.step, FULL)
    except AssertionError:  # overwritten or freed since the holdings were listed
        return None, bad + [own], False, False
    with ThreadPoolExecutor(1, thread_name_prefix="tierflow-verify") as pool:
        intact = pool.submit(snap.verify, own)
        try:
            step = _apply_body(snap, body, header.payload_len, header.meta_len)
        except Exception:
            if intact.result():
                raise
            step = None
        if not intact.result():
            return None, bad + [own], False, True
    return step, bad, False, False


def _apply_body(snap: Snapshotter, body: memoryview, payload_len: int, meta_len: int) -> int:
    meta = meta_from_bytes(body[payload_len:payload_len + meta_len])
    tensors = views_from_payload(meta["layout"], torch.frombuffer(body, dtype=torch.uint8)[:payload_len]
                                 if payload_len else torch.empty(0, dtype=torch.uint8))
    step = snap.state.apply(tensors, meta, rng=meta["rng"])
    snap.restored_note = dict(meta.get("note") or {})
    return step


def _detail(plan: RestorePlan, rank: int, nodes: Sequence[str]) -> str:
    peers_txt = ", ".join(f"rank {r} from node(s) {'/'.join(sorted({nodes[h] for h, _, _ in v}))}"
                          for r, v in sorted(plan.from_peers.items()))
    detail = (f"from memory of node {nodes[rank]}" if rank in plan.local else f"from peers {peers_txt}")
    if plan.from_peers and rank in plan.local:
        detail += f" (rebuilt from peers: {peers_txt})"
    return detail


def _used_by(plan: RestorePlan, holdings: Sequence[Holding], rank: int) -> List[Holding]:
    """The segments this rank reads for ``plan``: its own FULL snapshot and the shards it sends."""
    out = []
    for h in holdings:
        if h.holder != rank or h.step != plan.step:
            continue
        if h.kind == FULL and h.src == rank and rank in plan.local:
            out.append(h)
        elif h.kind == SHARD and any(holder == rank and index == h.shard_index
                                     for holder, index, _ in plan.from_peers.get(h.src, ())):
            out.append(h)
    return out
