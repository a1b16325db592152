"""Small tensors of one point move together.

Note [packs]: a transformer step saves thousands of small tensors (norm statistics, biases'
gradients, masks), and the runtime's cost per transfer (a slot, a handle, a task, the locks
around them; on CUDA an event and its waits) is paid per tensor, however small. So the
storages of at most :data:`PACK_BYTES` that one point offloads to the same pooled tier share one
slot and one transfer: :meth:`Residency.batch` collects the offloads of a point and, at its end,
packs them (at :data:`ALIGN`-byte offsets, up to :data:`PACK_LIMIT` bytes a pack) and writes each
pack with one ``write_packed``. Each member keeps its own entry: it is freed at its own free
point, and the members one point prefetches come back with one ``read_packed`` of their parts.
The slot goes back to the tier when the last member has come back or died.

Parameters are never packed (they keep clean copies of their own, Note [clean copies]), nor is a
storage alone at its point (a pack of one only adds work).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from tierflow.offload.core.units import align_up
from tierflow.offload.tiers.base import Slot, Tier

__all__ = ["ALIGN", "PACK_BYTES", "PACK_LIMIT", "Pack", "layout"]

PACK_BYTES = 64 << 10  # a storage this small or smaller moves in a pack with the others of its point
PACK_LIMIT = 4 << 20  # bytes of one pack
ALIGN = 64  # each member starts at a multiple of this (a cache line)


class Pack:
    """One slot several entries share; freed when the last of them lets go."""

    __slots__ = ("tier", "slot", "left")

    def __init__(self, tier: Tier, slot: Slot, members: int) -> None:
        self.tier, self.slot, self.left = tier, slot, members

    def leave(self) -> None:
        """One member no longer needs its bytes here."""
        self.left -= 1
        if self.left == 0:
            self.tier.free(self.slot)


def layout(entries: List[Any]) -> List[Tuple[List[Any], List[int], int]]:
    """Split ``entries`` (with ``nbytes``) into packs of at most :data:`PACK_LIMIT` bytes:
    ``(members, their offsets, the pack's size)`` each, in order."""
    packs: List[Tuple[List[Any], List[int], int]] = []
    members: List[Any] = []
    offsets: List[int] = []
    end = 0
    for entry in entries:
        at = align_up(end, ALIGN)
        if members and at + entry.nbytes > PACK_LIMIT:
            packs.append((members, offsets, end))
            members, offsets, at = [], [], 0
        members.append(entry)
        offsets.append(at)
        end = at + entry.nbytes
    if members:
        packs.append((members, offsets, end))
    return packs


def by_tier(entries: List[Any]) -> Dict[int, List[Any]]:
    """Entries grouped by their tier object, in order."""
    groups: Dict[int, List[Any]] = {}
    for entry in entries:
        groups.setdefault(id(entry.tier), []).append(entry)
    return groups
