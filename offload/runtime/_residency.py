"""The runtime's residency table: which tensor storages are off the device, where, and in what state.

Keyed by stable trace keys (parameter names, ``name:grad``, ``name:exp_avg``,
``module[call]:saved<i>``), never by attributes on torch objects. One entry per storage that is
away or on its way; a key without an entry is resident.

Note [storage swap]: a tensor leaves by copying its whole storage into a tier slot and then
shrinking the storage to zero bytes (``untyped_storage().resize_(0)``, as FSDP does); it comes
back by growing the same storage again and reading the slot into it. Every tensor and view on the
storage (autograd's saved ones, the parameter itself, a stray Python reference) sees the bytes
again, unchanged, with no version-counter bump: this is why a run with offloading is bit-identical
to one without. A storage is only shrunk once its copy has finished.

States of an entry: ``writing`` (copy out in flight, bytes still on the device), ``absent``
(device storage empty, the slot holds the bytes), ``reading`` (storage grown again, copy back in
flight). ``arrive`` waits for the copy back and drops the entry.

Note [absent is weak]: while an entry is ``absent`` it holds its (empty) storage only weakly. A
storage nobody else holds any more (a saved activation whose graph autograd freed) is dead: its
bytes need not come back, and the entry is simply dropped when it would be fetched. While a copy
is in flight the entry holds the storage strongly (the copy reads or writes its memory).

Note [clean copies]: a parameter that comes back keeps its tier copy (its slot is not freed)
while its version counter says it is unchanged; evicting it again then only frees the device
memory. Parameters change only in the optimizer step, so in forward and backward each leaves the
device at no I/O cost, as ZeRO-Infinity releases gathered parameters without writing them. Both
executors drop the copies of the parameters an optimizer step is about to update (so an
optimizer that writes ``p.data``, which no version counter sees, is covered too), and a tier that
runs out of room frees every clean copy before it gives up.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from tierflow.offload.core.errors import TierError, TierFullError
from tierflow.offload.runtime._bytes import alias_bytes
from tierflow.offload.runtime._packs import PACK_BYTES, Pack, by_tier, layout
from tierflow.offload.tiers.base import Slot, Tier, TransferHandle

__all__ = ["Residency", "TransferStats", "alias_bytes"]

WRITING, ABSENT, READING = "writing", "absent", "reading"


@dataclass
class TransferStats:
    """Counters of one step (reset by the runtime at each step start).

    Attributes:
        bytes_out: Per tier name, bytes copied off the device.
        bytes_in: Per tier name, bytes copied back.
        stall_s: Seconds compute waited for transfers (offloads to finish before freeing,
            prefetches to arrive, on-demand fetches).
        on_demand: Fetches that were not prefetched ahead (the fallback, or a late plan).
    """

    bytes_out: Dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    bytes_in: Dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    stall_s: float = 0.0
    on_demand: int = 0


class _Entry:
    __slots__ = ("key", "storage", "sid", "ref", "nbytes", "tier_name", "tier", "slot", "handle", "state", "streams",
                 "pack", "offset")

    def __init__(self, key: str, storage: torch.UntypedStorage, tier_name: str, tier: Tier) -> None:
        self.key, self.storage, self.sid, self.nbytes = key, storage, id(storage), storage.nbytes()
        self.ref: Optional["weakref.ref[torch.UntypedStorage]"] = None  # while absent (Note [absent is weak])
        self.tier_name, self.tier = tier_name, tier
        self.slot: Optional[Slot] = None
        self.handle: Optional[TransferHandle] = None
        self.state = WRITING
        self.streams = tier.device_streams(storage)  # None: host transfers (Note [stream-ordered copies])
        self.pack: Optional[Pack] = None  # the slot it shares with others of its point (Note [packs])
        self.offset = 0  # its bytes' place in the pack's slot

    def resize(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Shrink or grow the device storage, on the compute stream when streams order its copies."""
        if self.streams is None:
            storage.resize_(nbytes)
        elif nbytes:
            self.streams.grow(storage, nbytes)
        else:
            self.streams.free(storage)


def _ours(method):
    """Run a table method as the runtime's own work: operations it issues on this thread (a tier
    staging a copy, a view for the transfer) are neither faulted, counted nor traced."""

    @functools.wraps(method)
    def wrapper(self: "Residency", *args, **kwargs):
        self.transferring += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self.transferring -= 1

    return wrapper


class Residency:
    """Moves storages between the device and tiers, and knows where each one is.

    Args:
        tier_for: Maps a plan tier name (``host``, ``nvme:0``, ``numa:1``) to an open Tier.
        max_inflight: Transfers of this table in flight at once (0: no limit). Fewer hold less
            memory in flight (a prefetched storage is allocated when its read starts) but overlap
            less compute; the oldest transfer is waited for (a stall) to make room.
    """

    def __init__(self, tier_for: Callable[[str], Tier], max_inflight: int = 0,
                 version_of: Optional[Callable[[str], Optional[int]]] = None) -> None:
        self._tier_for = tier_for
        self.max_inflight = max_inflight
        # Note [clean copies]: key -> (slot, tier name, tier, bytes, version) of a tier copy kept
        # after the tensor came back, reused by its next offload while the tensor is unchanged.
        self._version_of = version_of
        self.clean: Dict[str, Tuple[Slot, str, Tier, int, int]] = {}
        self.entries: Dict[str, _Entry] = {}
        self._by_storage: Dict[int, str] = {}  # id(storage) -> key of its entry
        self.transferring = 0  # > 0 while this thread may run one of our own copies
        self._inflight: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self.stats = TransferStats()
        self.absent_bytes = 0  # device bytes held away now
        self.absent_min = 0  # the least absent_bytes since the runtime last reset it (a point)
        self.waited_total_s = 0.0  # every stall since the table was made (the tracer subtracts it)
        self._batch: Optional[Tuple[List[_Entry], List[_Entry]]] = None  # offloads, prefetches (Note [packs])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Offloads and prefetches asked for inside the block move small storages together; their
        transfers start when the block ends (Note [packs]). Blocks do not nest."""
        self._batch = ([], [])
        try:
            yield
        finally:
            self._flush()
            self._batch = None

    # --- the four plan actions ------------------------------------------------------------

    @_ours
    def offload(self, key: str, storage: torch.UntypedStorage, tier_name: str) -> bool:
        """Start copying ``storage`` out (evict point). False when it cannot move (already away,
        empty, or not resizable); the tensor then simply stays."""
        if key in self.entries and self._dead(self.entries[key]):
            self.discard(key)  # the key's previous tensor died while away (a gradient set to None)
        if key in self.entries or storage.nbytes() == 0 or not storage.resizable() or storage.device.type == "meta":
            return False
        entry = _Entry(key, storage, tier_name, self._tier_for(tier_name))
        if self._reuse_clean(entry):
            self.entries[key] = entry
            self._by_storage[entry.sid] = key
            return True
        if self._batch is not None and self._packable(entry):
            self._batch[0].append(entry)  # written at the end of the batch
        else:
            self._write(entry.tier, [entry], [0], entry.nbytes)
        self.entries[key] = entry
        self._by_storage[entry.sid] = key
        self.stats.bytes_out[tier_name] += entry.nbytes
        return True

    @_ours
    def release(self, key: str) -> None:
        """Free the device copy once the copy out is done (free point)."""
        entry = self.entries.get(key)
        if entry is None or entry.state != WRITING:
            return
        self._flush()
        self._wait(entry, ordered=True)
        entry.resize(entry.storage, 0)
        entry.ref, entry.storage = weakref.ref(entry.storage), None  # Note [absent is weak]
        entry.state = ABSENT
        self.absent_bytes += entry.nbytes

    @_ours
    def prefetch(self, key: str) -> None:
        """Grow the storage again and start the copy back (prefetch point)."""
        entry = self.entries.get(key)
        if entry is None or entry.state != ABSENT:
            return
        storage = entry.ref()
        if storage is None:  # dead while away: nothing to bring back (Note [absent is weak])
            self.discard(key)
            return
        entry.storage, entry.ref = storage, None
        self._make_room()
        entry.resize(entry.storage, entry.nbytes)
        self._set_absent(self.absent_bytes - entry.nbytes)
        entry.state = READING
        self.stats.bytes_in[entry.tier_name] += entry.nbytes
        if self._batch is not None and entry.pack is not None:
            self._batch[1].append(entry)  # read with the others of its pack at the end of the batch
            return
        entry.handle = self._read(entry.tier, entry.slot, [entry])
        self._inflight[key] = None

    @_ours
    def arrive(self, key: str) -> None:
        """Make ``key`` resident now: wait for its copy back, or fetch it on demand; drop the entry.

        An entry still ``writing`` is cancelled: the bytes never left the device.
        """
        entry = self.entries.get(key)
        if entry is None:
            return
        if entry.state == ABSENT:
            self.prefetch(key)
            if key not in self.entries:
                return  # it was dead
            self.stats.on_demand += 1
        self._flush()
        self._wait(entry, ordered=True)
        version = self._version_of(key) if self._version_of is not None else None
        if version is not None and entry.pack is None:  # the slot holds what the storage holds now (Note [clean copies])
            self.clean[key] = (entry.slot, entry.tier_name, entry.tier, entry.nbytes, version)
        else:
            self._let_go(entry)
        self._forget(key, entry)

    def _reuse_clean(self, entry: _Entry) -> bool:
        """Note [clean copies]: a tensor that comes back keeps its tier copy while it is unchanged
        (parameters in forward and backward: only the optimizer writes them). Its next offload
        to the same tier then writes nothing: the copy is already there. Changed (its version
        counter moved, or :meth:`forget_clean` was told so) or going elsewhere, the copy is freed."""
        kept = self.clean.pop(entry.key, None)
        if kept is None:
            return False
        slot, tier_name, tier, nbytes, version = kept
        if tier_name == entry.tier_name and nbytes == entry.nbytes and version == self._version_of(entry.key):
            entry.slot = slot
            return True
        tier.free(slot)
        return False

    def forget_clean(self, keys: Iterable[str]) -> None:
        """These tensors are about to change (an optimizer step): free their clean copies."""
        for key in keys:
            kept = self.clean.pop(key, None)
            if kept is not None:
                kept[2].free(kept[0])

    def free_clean(self) -> None:
        """Free every clean copy."""
        self.forget_clean(list(self.clean))

    def adopt(self, key: str, storage: torch.UntypedStorage, nbytes: int, tier_name: str, slot: Slot) -> None:
        """Take over a storage whose bytes already wait in ``slot`` of a tier (an empty storage now:
        a model materialised into a tier, see ``TierPlacement``); it is absent from here on.

        Raises:
            ValueError: ``key`` already has an entry, or the storage is not empty.
        """
        if key in self.entries:
            raise ValueError(f"{key!r} is already held away")
        if storage.nbytes():
            raise ValueError(f"{key!r}: only an empty storage can be adopted, this one has {storage.nbytes()} bytes")
        entry = _Entry(key, storage, tier_name, self._tier_for(tier_name))
        entry.nbytes, entry.slot, entry.state = nbytes, slot, ABSENT
        entry.ref, entry.storage = weakref.ref(storage), None
        self.entries[key] = entry
        self._by_storage[entry.sid] = key
        self._set_absent(self.absent_bytes + nbytes)

    # --- what the tracer asks (profiling.MovingTensors: Note [tracing under a budget]) ----------

    def away_bytes(self, storage: torch.UntypedStorage) -> int:
        """Device bytes of ``storage`` while an entry holds it away, else 0."""
        key = self.key_of(storage)
        return self.entries[key].nbytes if key is not None else 0

    def bytes_to_arrive(self, key: str) -> int:
        """Device bytes :meth:`arrive` would allocate for ``key`` now (0: resident or still on the device)."""
        entry = self.entries.get(key)
        return entry.nbytes if entry is not None and entry.state == ABSENT else 0

    def busy(self) -> bool:
        """Whether this thread is running one of the table's own copies now."""
        return self.transferring > 0

    def waited_s(self) -> float:
        """Seconds waited for transfers since the table was made."""
        return self.waited_total_s

    # --- helpers ----------------------------------------------------------------------------

    def evict_now(self, key: str, storage: torch.UntypedStorage, tier_name: str) -> int:
        """Offload and free at once (the fallback's evictions); returns the bytes freed."""
        if not self.offload(key, storage, tier_name):
            return 0
        self.release(key)
        return self.entries[key].nbytes

    def key_of(self, storage: torch.UntypedStorage) -> Optional[str]:
        """The key of the entry that holds ``storage`` away (or is moving it), if any."""
        key = self._by_storage.get(id(storage))
        entry = self.entries.get(key) if key is not None else None
        if entry is None:
            return None
        held = entry.storage if entry.ref is None else entry.ref()
        return key if held is storage else None

    def state(self, key: str) -> Optional[str]:
        entry = self.entries.get(key)
        return None if entry is None else entry.state

    # Note [evict before entering]: the first step under a plan (after profiling, an evaluation or a
    # divergence) starts from what the online policy left resident. The executor first evicts what
    # the plan keeps away at its start, then brings back the rest with ``arrive_all``. The other way
    # round, the two added up for an instant: the first planned step of a 12-layer GPT of width
    # 2048 on FSDP2 (2 ranks, NVMe) reached 0.4 GB of RSS above its 2 GiB budget, 0.85 GB at 36.
    def arrive_all(self, keep: Callable[[str], bool] = lambda key: False) -> None:
        """Bring back every entry for which ``keep(key)`` is False."""
        for key in [k for k in self.entries if not keep(k)]:
            self.arrive(key)

    def arrive_what_can(self) -> Optional[TierError]:
        """Bring back every entry; one whose read fails (its checksum) stays away while the others
        still come back. Returns the first such error (None when all came back)."""
        failed = None
        for key in list(self.entries):
            try:
                self.arrive(key)
            except TierError as exc:
                failed = failed or exc
        return failed

    @_ours
    def discard(self, key: str) -> None:
        """Forget an entry whose tensor is dead (an activation after its graph was freed)."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        if entry.handle is not None and entry.handle.stream_ordered:
            entry.handle.order_compute()  # the storage may die now: its memory is reused after the copy
        elif entry.handle is not None:
            entry.handle.exception()  # settle it; nobody needs the bytes any more
        if entry.state == ABSENT:
            self._set_absent(self.absent_bytes - entry.nbytes)
        self._drop_pending(entry)
        if entry.slot is not None:
            self._let_go(entry)
        self._inflight.pop(key, None)
        self._forget(key, entry)

    def drop_dead(self) -> None:
        """Forget every entry whose tensor died while away (its tier slot is freed)."""
        for key in [k for k, e in self.entries.items() if self._dead(e)]:
            self.discard(key)

    @staticmethod
    def _dead(entry: _Entry) -> bool:
        return entry.state == ABSENT and entry.ref is not None and entry.ref() is None

    def _forget(self, key: str, entry: _Entry) -> None:
        self.entries.pop(key, None)
        if self._by_storage.get(entry.sid) == key:
            del self._by_storage[entry.sid]

    def _set_absent(self, value: int) -> None:
        self.absent_bytes = value
        self.absent_min = min(self.absent_min, value)

    def _wait(self, entry: _Entry, ordered: bool = False) -> None:
        """Wait for the entry's transfer. With ``ordered``, a stream-ordered copy is not waited for
        on the host: the compute stream waits for it instead (Note [stream-ordered copies])."""
        handle = entry.handle
        if ordered and handle is not None and handle.stream_ordered:
            handle.order_compute()
            entry.handle = None
            self._inflight.pop(entry.key, None)
            return
        self.transferring += 1  # a copy run on this thread (Note [help while waiting]) is ours, not the model's
        try:
            if handle is not None and not handle.done():
                start = time.perf_counter()
                handle.wait()
                waited = time.perf_counter() - start
                self.stats.stall_s += waited
                self.waited_total_s += waited
            elif handle is not None:
                handle.wait()  # raises the transfer's error, if any
        except BaseException:
            if entry.state == READING:  # a failed read (a checksum): the storage never holds what it read
                self._unread(entry)
            raise
        finally:
            self.transferring -= 1
        entry.handle = None
        self._inflight.pop(entry.key, None)

    def _unread(self, entry: _Entry) -> None:
        """Put an entry whose read failed back as it was before the read: away, its storage empty
        (a tensor in it raises on use instead of computing with bytes that failed their check)."""
        entry.handle.exception()  # settle the other chunks of the read
        entry.handle = None
        entry.resize(entry.storage, 0)
        entry.ref, entry.storage = weakref.ref(entry.storage), None
        entry.state = ABSENT
        self._set_absent(self.absent_bytes + entry.nbytes)
        self._inflight.pop(entry.key, None)

    # --- packs (Note [packs]) ---------------------------------------------------------------------

    def _packable(self, entry: _Entry) -> bool:
        return entry.nbytes <= PACK_BYTES and entry.tier.packs and (
            self._version_of is None or self._version_of(entry.key) is None)

    def _reserve(self, tier: Tier, nbytes: int) -> Slot:
        try:
            return tier.reserve(nbytes)
        except TierFullError:
            if not self.clean:
                raise
            self.free_clean()  # clean copies are a convenience: give their room to what must leave now
            return tier.reserve(nbytes)

    def _read(self, tier: Tier, slot: Slot, entries: List[_Entry]) -> TransferHandle:
        if entries[0].pack is None:
            return tier.read(slot, alias_bytes(entries[0].storage))
        return tier.read_packed(slot, [(e.offset, alias_bytes(e.storage)) for e in entries])

    @_ours
    def _flush(self) -> None:
        """Start the transfers a batch collected: each group of small offloads as packs, each pack's
        prefetched members as one read."""
        if self._batch is None or not (self._batch[0] or self._batch[1]):
            return
        offloads, prefetches = self._batch
        self._batch = ([], [])
        reads: Dict[int, List[_Entry]] = {}  # prefetches first (Note [prefetch before offload])
        for entry in prefetches:
            reads.setdefault(id(entry.pack), []).append(entry)
        for members in reads.values():
            handle = self._read(members[0].tier, members[0].pack.slot, members)
            for entry in members:
                entry.handle = handle
                self._inflight[entry.key] = None
        try:
            for group in by_tier(offloads).values():
                for members, offsets, size in layout(group):  # a group of one is a "pack" of one: written alone
                    self._write(members[0].tier, members, offsets, size)
        except BaseException:
            for entry in offloads:  # what did not start never left: resident, as if never asked to move
                if entry.slot is None and self.entries.get(entry.key) is entry:
                    self.stats.bytes_out[entry.tier_name] -= entry.nbytes
                    self._forget(entry.key, entry)
            raise

    def _write(self, tier: Tier, members: List[_Entry], offsets: List[int], size: int) -> None:
        self._make_room()
        slot = self._reserve(tier, size)
        if len(members) == 1:
            handle = tier.write(slot, alias_bytes(members[0].storage))
        else:
            pack = Pack(tier, slot, len(members))
            for entry, offset in zip(members, offsets):
                entry.pack, entry.offset = pack, offset
            handle = tier.write_packed(slot, [(o, alias_bytes(e.storage)) for e, o in zip(members, offsets)])
        for entry in members:
            entry.slot, entry.handle = slot, handle
            self._inflight[entry.key] = None

    def _drop_pending(self, entry: _Entry) -> None:
        if self._batch is not None:
            for pending in self._batch:
                if entry in pending:
                    pending.remove(entry)

    @staticmethod
    def _let_go(entry: _Entry) -> None:
        """The entry no longer needs its tier copy: free its slot, or its share of a pack."""
        if entry.pack is not None:
            entry.pack.leave()
        else:
            entry.tier.free(entry.slot)

    def _make_room(self) -> None:
        while self.max_inflight and len(self._inflight) >= self.max_inflight:
            oldest = next(iter(self._inflight))
            self._wait(self.entries[oldest])
