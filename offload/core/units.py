"""Small helpers shared by the tier modules: byte formatting and alignment."""

from __future__ import annotations

__all__ = ["PAGE_BYTES", "align_up", "format_bytes"]

# O_DIRECT and mbind both work in whole pages; 4 KiB also matches the logical block size of
# every NVMe namespace format we target, so one alignment serves memory and disk.
PAGE_BYTES = 4096


def align_up(nbytes: int, alignment: int = PAGE_BYTES) -> int:
    """Round ``nbytes`` up to a multiple of ``alignment`` (a power of two)."""
    return (nbytes + alignment - 1) & ~(alignment - 1)


def format_bytes(nbytes: float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 << 20) == '3.0 MiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
