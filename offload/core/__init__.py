"""The vocabulary that ``plan/`` and ``tiers/`` share without importing each other.

Pure data and small helpers only: the HardwareModel (what the planner reads, what calibration
writes), tier names, the error types, byte units and the validation helpers. Nothing here opens a
file, starts a thread or touches a device.
"""

from tierflow.offload.core.errors import (
    ChecksumError,
    TierConfigError,
    TierError,
    TierFullError,
    TierIOError,
    TransferCancelled,
)
from tierflow.offload.core.hardware import TIER_KINDS, HardwareModel, LinkModel, LinkSample, TierModel, fit_link
from tierflow.offload.core.names import TierName, kind_of
from tierflow.offload.core.units import PAGE_BYTES, align_up, format_bytes
from tierflow.offload.core.validation import one_of, raise_if

__all__ = [
    "PAGE_BYTES",
    "TIER_KINDS",
    "ChecksumError",
    "HardwareModel",
    "LinkModel",
    "LinkSample",
    "TierConfigError",
    "TierError",
    "TierFullError",
    "TierIOError",
    "TierModel",
    "TierName",
    "TransferCancelled",
    "align_up",
    "fit_link",
    "format_bytes",
    "kind_of",
    "one_of",
    "raise_if",
]
