"""Tier names: one definition of what ``"host"``, ``"numa:0"`` and ``"nvme:1"`` mean.

A HardwareModel, a plan and the engine name tiers alike: the kind, then ``:index`` when a machine
can have several of that kind (NUMA nodes, NVMe paths). Parse a name once into a :class:`TierName`
instead of splitting strings where it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["TierName", "kind_of"]

#: Kinds that come numbered (``numa:0``), because a machine may have several of them.
_NUMBERED = ("numa", "nvme")


@dataclass(frozen=True)
class TierName:
    """A tier's kind and, for numbered kinds, its index.

    Attributes:
        kind: ``device``, ``host``, ``numa`` or ``nvme``.
        index: Which one of its kind (None for unnumbered kinds).

    Example:
        >>> TierName.parse("nvme:1").kind
        'nvme'
        >>> str(TierName.first("numa"))
        'numa:0'
    """

    kind: str
    index: Optional[int] = None

    @classmethod
    def parse(cls, name: str) -> "TierName":
        """``"nvme:1"`` -> ``TierName("nvme", 1)``; ``"host"`` -> ``TierName("host")``."""
        kind, sep, index = str(name).partition(":")
        if not kind or (sep and not index.isdigit()):
            raise ValueError(f"tier name {name!r} is not valid; use a kind such as 'host', or 'kind:N' such as 'nvme:0'")
        return cls(kind, int(index) if sep else None)

    @classmethod
    def first(cls, kind: str) -> "TierName":
        """The name of the first (or only) tier of ``kind``, as an engine with one tier per kind uses."""
        return cls(kind, 0 if kind in _NUMBERED else None)

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def kind_of(name: str) -> str:
    """The kind of a tier name (``"nvme:0"`` -> ``"nvme"``), for sorting and filtering."""
    return TierName.parse(name).kind
