"""Lazy, asynchronous, double-buffered snapshots of one rank's training state into shared memory.

``snapshot(step)`` only takes references and copies the small meta (RNG, scheduler, step); a
background thread then copies the tensors into this rank's segment of the node's store while the
next forward/backward runs (they only read parameters and optimizer state). Two futures come
back: ``safe`` (the tensors are copied: the optimizer may mutate them) and ``durable`` (the
snapshot is committed locally, its shards sit on the peers, and, if asked, it is on disk). An
optimizer step pre-hook waits for ``safe``: the only place training can stall.

Note [double buffer]: each rank has two FULL segments (slots) per run; a snapshot always
overwrites the slot holding the *older* committed snapshot (or an empty one), after removing its
commit marker. A crash mid-copy therefore leaves the other slot's snapshot intact.

Note [one snapshot in flight]: a new snapshot first waits for the previous one to be durable, so
the background thread's collectives on the checkpoint group run in the same order on every rank
and a slot is never written twice at once.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tierflow.trainer.checkpoint._erasure import encode_body
from tierflow.trainer.checkpoint._format import (
    FULL,
    HEADER_BYTES,
    SHARD,
    HeaderError,
    SnapshotHeader,
    checksum,
    hasher,
    invalidate,
    pack_header,
    parse_header,
    write_header,
)
from tierflow.trainer.checkpoint._peers import exchange_shards
from tierflow.trainer.checkpoint._state import (
    Captured,
    ModuleState,
    StateSource,
    TensorEntry,
    layout,
    meta_from_bytes,
    meta_to_bytes,
    views_from_payload,
)
from tierflow.trainer.checkpoint.persist import save_checkpoint
from tierflow.trainer.checkpoint.store import Segment, StoreClient

__all__ = ["Holding", "SnapshotHandle", "Snapshotter", "reference_tier_state"]

_CHUNK_BYTES = 1 << 20  # Note [copy in chunks]: fits in L2 next to the training's working set


@dataclass(frozen=True)
class SnapshotHandle:
    """The two signals of one snapshot. ``safe.result()`` / ``durable.result()`` return its step."""

    step: int
    safe: Future
    durable: Future


@dataclass(frozen=True)
class Holding:
    """One committed segment a rank holds: its own FULL snapshot or a SHARD of another rank's.

    Committed means its commit marker is there; its checksum is checked only when recovery is
    about to use it (:meth:`Snapshotter.verify`).
    """

    holder: int
    src: int
    step: int
    kind: int
    shard_index: int
    body_len: int
    image_len: int
    image_hash: int
    k: int
    m: int
    payload_len: int = 0
    meta_len: int = 0


def reference_tier_state(captured: Captured) -> Captured:
    """Seam for state already held in offload tiers: return ``captured`` minus what needs no copy.

    Today every tensor is copied into the snapshot. A tiered optimizer whose state already sits in
    host/NUMA/NVMe tiers can drop those tensors here and record tier references in
    ``captured.meta`` instead (copied tier-to-tier by the tier engine, never pulled through the
    device); the restore path then asks the tier for them.
    """
    return captured


class Snapshotter:
    """Takes this rank's snapshots into ``store`` and spreads them to peers.

    Args:
        state: what is snapshotted and restored (default: ``ModuleState(model, optimizer, scheduler)``).
        store: this node's store client.
        rank, world_size: this rank in the training world.
        run_key: names this run's segments (a hash of the config; 12 characters).
        config_hash: recorded in every snapshot.
        holders: ``holders[r][i]`` holds shard ``i`` of rank ``r`` (see ``shard_holders``); None: no peers.
        k, m: data and parity shards per snapshot.
        group: a gloo group used only by the snapshot thread (None when ``world_size == 1``).
        persist_dir: where DCP checkpoints go; keep: how many of them to keep.
        copy_nice: niceness of the copy thread (Linux, per thread; 0 leaves it): the copy yields
            the cores to the forward/backward and runs in their gaps. Higher hides the copy
            better on busy cores, but a copy not finished by the optimizer step stalls it.
    """

    def __init__(self, *, store: StoreClient, rank: int, world_size: int, run_key: str, config_hash: str,
                 holders: Optional[List[List[int]]], k: int, m: int, group: Optional[dist.ProcessGroup],
                 persist_dir: Path, keep: int = 2, state: Optional[StateSource] = None,
                 model: Optional[nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler: Any = None, copy_nice: int = 5,
                 copy_hook: Optional[Callable[[int, int], None]] = None) -> None:
        if state is None:
            if model is None or optimizer is None:
                raise ValueError("Snapshotter needs state= or model= and optimizer=")
            state = ModuleState(model, optimizer, scheduler)
        self.state, self.store, self.copy_nice = state, store, copy_nice
        self.rank, self.world_size, self.run_key, self.config_hash = rank, world_size, run_key, config_hash
        self.holders, self.k, self.m, self.group = holders, k, m, group
        self.persist_dir, self.keep = Path(persist_dir), keep
        self._copy_hook = copy_hook  # fault injection for tests: called before each tensor copy
        self._streams: Dict[torch.device, Any] = {}  # the copy thread's stream per CUDA device (Note [a stream per device])
        self._queue: "queue.Queue[Optional[Tuple]]" = queue.Queue()
        self._last: Optional[SnapshotHandle] = None
        self.error: Optional[BaseException] = None
        self.num_snapshots = 0
        self.num_persisted = 0
        self.stall_s = 0.0  # training-visible: time spent inside snapshot() and waiting for `safe`
        self.copy_s = 0.0
        self.last_persisted: Optional[Path] = None
        self.restored_note: Dict[str, Any] = {}  # the note of the snapshot recovery applied last
        self._thread = threading.Thread(target=self._worker, name="tierflow-snapshot", daemon=True)
        self._thread.start()

    # --- naming -----------------------------------------------------------------------------
    def _full_name(self, slot: int) -> str:
        return f"{self.run_key}-full-r{self.rank}-s{slot}"

    def _shard_name(self, src: int, slot: int) -> str:
        return f"{self.run_key}-shard-r{src}-h{self.rank}-s{slot}"

    def _pick_slot(self, names: List[str], size: int) -> Segment:
        """The slot to overwrite: an empty one, else the one holding the older step (Note [double buffer])."""
        best: Tuple[int, int] = (2**62, 0)
        for slot, suffix in enumerate(names):
            seg = self.store.open_existing(self.store.prefix + suffix)
            h = parse_header(seg.buf) if seg is not None and seg.size >= HEADER_BYTES else None
            step = -1 if h is None else h.step
            best = min(best, (step, slot))
        return self.store.segment(names[best[1]], size)

    # --- taking snapshots -------------------------------------------------------------------
    def snapshot(self, step: int, *, persist: bool = False, note: Optional[Dict[str, Any]] = None) -> SnapshotHandle:
        """Start a snapshot of the state after ``step`` optimizer steps; returns at once.

        ``note``: small JSON values kept beside the state (the trainer's last loss) and handed
        back by the restore that uses this snapshot (``RestoreResult.note``).
        """
        t0 = time.perf_counter()
        self.drain()  # Note [one snapshot in flight]
        cap = reference_tier_state(self.state.capture(step, self.config_hash))
        cap.meta["note"] = dict(note or {})
        entries, payload_len = layout(cap.tensors)
        meta_bytes = meta_to_bytes(cap.meta, entries)
        body_len = payload_len + len(meta_bytes)
        seg = self._pick_slot([self._full_name(0), self._full_name(1)], HEADER_BYTES + body_len + len(meta_bytes))
        invalidate(seg.buf)
        events = _step_events(cap.tensors)  # the copy streams wait for the optimizer step that produced the state
        handle = SnapshotHandle(step, Future(), Future())
        self._last = handle
        self.num_snapshots += 1
        self._queue.put((handle, cap, entries, payload_len, meta_bytes, seg, events, persist))
        self.stall_s += time.perf_counter() - t0
        return handle

    def wait_safe(self) -> None:
        """Block until the last snapshot's tensors are copied (the optimizer step pre-hook)."""
        if self._last is not None and not self._last.safe.done():
            t0 = time.perf_counter()
            self._last.safe.result()
            self.stall_s += time.perf_counter() - t0
        self._raise_if_failed()

    def drain(self) -> None:
        """Block until the last snapshot is durable."""
        if self._last is not None:
            try:
                self._last.durable.result()
            except BaseException:
                pass
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the snapshot thread failed: {self.error}") from self.error

    def close(self) -> None:
        """Finish the snapshot in flight and stop the thread (segments stay in the store)."""
        self._queue.put(None)
        self._thread.join(timeout=600)

    # --- the background thread --------------------------------------------------------------
    def _worker(self) -> None:
        if self.copy_nice > 0 and hasattr(os, "setpriority"):
            try:  # Linux: PRIO_PROCESS with a thread id renices that thread only
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.copy_nice)
            except OSError:
                pass
        while True:
            job = self._queue.get()
            if job is None:
                return
            handle = job[0]
            try:
                self._run(*job)
            except BaseException as exc:  # surfaced to the training thread by wait_safe/drain
                self.error = exc
                for fut in (handle.safe, handle.durable):
                    if not fut.done():
                        fut.set_exception(exc)

    def _run(self, handle: SnapshotHandle, cap: Captured, entries: List[TensorEntry], payload_len: int,
             meta_bytes: bytes, seg: Segment, events, persist: bool) -> None:
        t0 = time.perf_counter()
        payload = seg.tensor()[HEADER_BYTES:HEADER_BYTES + payload_len]
        if events is None:
            digest = self._copy_and_hash(handle.step, cap, entries, payload)
        else:
            digest = self._copy_cuda(handle.step, cap, entries, payload, events)
        handle.safe.set_result(handle.step)
        self.copy_s += time.perf_counter() - t0
        # Durable: meta, checksum, then the commit marker last (Note [commit marker last]).
        buf = seg.buf
        body_len = payload_len + len(meta_bytes)
        buf[HEADER_BYTES + payload_len:HEADER_BYTES + body_len] = meta_bytes
        digest.update(meta_bytes)
        body_hash = digest.intdigest()
        header = SnapshotHeader(kind=FULL, step=handle.step, rank=self.rank, world_size=self.world_size,
                                run_key=self.run_key, body_len=body_len, body_hash=body_hash,
                                payload_len=payload_len, meta_len=len(meta_bytes), k=self.k, m=self.m,
                                image_len=body_len, image_hash=body_hash)
        write_header(buf, header)
        if self.holders is not None and self.m > 0:
            self._push_shards(buf[HEADER_BYTES:HEADER_BYTES + body_len], header)
        if persist:
            meta = meta_from_bytes(meta_bytes)
            views = views_from_payload(entries, payload)
            self.last_persisted = save_checkpoint(self.persist_dir, handle.step, views, meta, rank=self.rank,
                                                  world_size=self.world_size, group=self.group, keep=self.keep)
            self.num_persisted += 1
            del views
        del payload, buf
        handle.durable.set_result(handle.step)

    def _copy_and_hash(self, step: int, cap: Captured, entries: List[TensorEntry], payload: torch.Tensor):
        """Copy host tensors into the payload in chunks, hashing each chunk while it is in cache.

        Note [copy in chunks]: numpy's copy and XXH3 both release the GIL and run on this thread
        alone (a torch copy would start its own intra-op threads next to the training's), and a
        chunk of ``_CHUNK_BYTES`` is hashed right after it lands, still in cache, so checksumming
        costs almost no extra memory traffic. Padding between tensors is hashed with the next
        chunk: the digest covers the payload byte for byte, in order.
        """
        dst = payload.numpy()
        view = memoryview(dst)
        digest, hashed = hasher(), 0
        for i, (entry, (_, tensor)) in enumerate(zip(entries, cap.tensors)):
            if self._copy_hook is not None:
                self._copy_hook(step, i)
            if entry.nbytes == 0:
                continue
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
            src = tensor.reshape(-1).view(torch.uint8).numpy()
            for a in range(0, entry.nbytes, _CHUNK_BYTES):
                b = min(a + _CHUNK_BYTES, entry.nbytes)
                np.copyto(dst[entry.offset + a:entry.offset + b], src[a:b])
                digest.update(view[hashed:entry.offset + b])
                hashed = entry.offset + b
        digest.update(view[hashed:len(dst)])
        return digest

    def _copy_cuda(self, step: int, cap: Captured, entries: List[TensorEntry], payload: torch.Tensor, events):
        """Device tensors: copy on a side stream of their own device that waits for the step's event
        there, then hash on the host.

        Note [a stream per device]: a stream made without a device is on the thread's current
        device, and this copy thread's is device 0 whatever the rank's is. On a rank using
        ``cuda:N`` the copies then ran on ``cuda:N``'s current stream, unordered with the side
        stream that was synchronized, and the payload could be hashed before they landed.
        """
        views = views_from_payload(entries, payload)
        streams = {}
        for device, event in events.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            stream.wait_event(event)
            streams[device] = stream
        for i, (key, tensor) in enumerate(cap.tensors):
            if self._copy_hook is not None:
                self._copy_hook(step, i)
            if tensor.is_cuda:
                with torch.cuda.stream(streams[tensor.device]):
                    views[key].copy_(tensor, non_blocking=True)
            else:
                views[key].copy_(tensor)
        for stream in streams.values():
            stream.synchronize()
        digest = hasher()
        digest.update(memoryview(payload.numpy()))
        return digest

    def _push_shards(self, body: memoryview, header: SnapshotHeader) -> None:
        shards = encode_body(body, self.k, self.m)
        headers = [b""] + [pack_header(replace(header, kind=SHARD, shard_index=i, body_len=len(shards[i]),
                                               body_hash=header.body_hash if self.k == 1 else checksum(shards[i])))
                           for i in range(1, len(shards))]
        landed: List[Tuple[Segment, SnapshotHeader]] = []

        def target(h: SnapshotHeader) -> torch.Tensor:
            names = [self._shard_name(h.rank, 0), self._shard_name(h.rank, 1)]
            seg = self._pick_slot(names, h.segment_bytes)
            invalidate(seg.buf)
            landed.append((seg, h))
            return seg.tensor()[HEADER_BYTES:HEADER_BYTES + h.body_len]

        exchange_shards(self.group, self.rank, self.holders, headers, shards, target)
        for seg, h in landed:
            write_header(seg.buf, h)

    # --- what this rank holds (restore) -----------------------------------------------------
    def holdings(self) -> List[Holding]:
        """Every committed segment of this run and world size that this rank holds.

        Only headers are read here (cheap); a checksum is checked only for the segments recovery
        chooses (:meth:`verify`), so a restore hashes one snapshot, not every slot.
        """
        out = []
        mine = (f"{self.run_key}-full-r{self.rank}-", f"{self.run_key}-shard-")
        for name in self.store.names():
            suffix = name[len(self.store.prefix):]
            if not suffix.startswith(mine) or ("-shard-" in suffix and f"-h{self.rank}-" not in suffix):
                continue
            seg = self.store.open_existing(name)
            try:
                h = parse_header(seg.buf) if seg is not None else None
            except HeaderError:
                h = None
            if h is None or h.run_key != self.run_key or h.world_size != self.world_size or len(seg.buf) < h.segment_bytes:
                continue
            held = Holding(self.rank, h.rank, h.step, int(h.kind), h.shard_index, h.body_len, h.image_len,
                           h.image_hash, h.k, h.m, h.payload_len, h.meta_len)
            # Both slots hold the same step when a step is snapshotted twice (finish() persisting
            # the last one): they are addressed by step, so one entry stands for both.
            if all((o.src, o.step, o.kind, o.shard_index) != (held.src, held.step, held.kind, held.shard_index)
                   for o in out):
                out.append(held)
        return out

    def verify(self, held: Holding) -> bool:
        """Whether a held segment is still there, unchanged, and matches its checksum."""
        try:
            body, h = self.read(held.src, held.step, held.kind, held.shard_index)
        except AssertionError:
            return False
        return checksum(body) == h.body_hash

    def discard(self, held: Holding) -> None:
        """Remove the commit marker of a held segment that failed its checksum (never chosen again)."""
        found = self._find(held.src, held.step, held.kind, held.shard_index)
        if found is not None:
            invalidate(found[0].buf)

    def read(self, src: int, step: int, kind: int, shard_index: int = 0) -> Tuple[memoryview, SnapshotHeader]:
        """The body (no copy) and header of a held segment."""
        found = self._find(src, step, kind, shard_index)
        if found is None:
            raise AssertionError(f"rank {self.rank} no longer holds the segment of rank {src} step {step}")
        seg, h = found
        return seg.buf[HEADER_BYTES:HEADER_BYTES + h.body_len], h

    def _find(self, src: int, step: int, kind: int, shard_index: int) -> Optional[Tuple[Segment, SnapshotHeader]]:
        if kind == FULL:
            names = [self._full_name(0), self._full_name(1)]
        else:
            names = [self._shard_name(src, 0), self._shard_name(src, 1)]
        for suffix in names:
            seg = self.store.open_existing(self.store.prefix + suffix)
            try:
                h = parse_header(seg.buf) if seg is not None and seg.size >= HEADER_BYTES else None
            except HeaderError:
                h = None
            if h is not None and h.step == step and h.rank == src and h.shard_index == shard_index \
                    and int(h.kind) == int(kind):
                return seg, h
        return None

    def free_all(self) -> None:
        """Remove this rank's segments of this run from the store (after a finished run)."""
        mine = [n for n in self.store.names()
                if n[len(self.store.prefix):].startswith((f"{self.run_key}-full-r{self.rank}-", f"{self.run_key}-shard-"))
                and ("-shard-" not in n or f"-h{self.rank}-" in n)]
        self.store.free(mine)


def _step_events(tensors) -> Optional[Dict[torch.device, Any]]:
    """Per CUDA device the captured tensors are on, an event recorded now on its current stream
    (Note [a stream per device]); None when every tensor is on the host."""
    devices = {t.device for _, t in tensors if t.is_cuda}
    if not devices:
        return None
    events = {}
    for device in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events[device] = event
    return events
