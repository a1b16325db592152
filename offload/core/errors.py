"""Errors raised by the tier engine.

Every error a user can cause names what was wrong and how to fix it; internal invariants raise
``AssertionError`` explicitly instead.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "TierConfigError",
    "TierError",
    "TierFullError",
    "TierIOError",
    "TransferCancelled",
]


class TierError(RuntimeError):
    """Base class of every tier engine error."""


class TierConfigError(ValueError):
    """A tier configuration is wrong; the one-line message names the key and what would be valid."""


class TierFullError(TierError):
    """A reservation does not fit: the message names the budget and the setting that raises it."""


class TierIOError(TierError):
    """A read or write failed (disk full, I/O error, unwritable directory); the message says where."""


class ChecksumError(TierIOError):
    """Bytes read back from a swap file do not match the checksum recorded when they were written."""


class TransferCancelled(TierError):
    """The transfer was still queued when its scheduler was closed, so it never ran."""
