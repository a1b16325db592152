"""The tier engine: the enabled tiers of a :class:`~tierflow.offload.tiers.config.TiersConfig` on one scheduler.

Example:
    >>> from offload import TierEngine, TiersConfig, HostTierConfig
    >>> with TierEngine(TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=1 << 20))) as engine:
    ...     sorted(engine.tiers)
    ['host']
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from tierflow.offload.tiers.base import Tier
from tierflow.offload.tiers.config import TiersConfig
from tierflow.offload.tiers.host import HostTier
from tierflow.offload.tiers.numa import NumaTier
from tierflow.offload.tiers.nvme import NvmeTier
from tierflow.offload.tiers.scheduler import TransferScheduler

__all__ = ["TierEngine"]


class TierEngine:
    """Opens every enabled tier around one shared :class:`TransferScheduler`.

    Sharing the scheduler is what makes the per-link limits and the prefetch-first order hold
    across tiers (a host->device prefetch and an NVMe offload compete in one place).

    Args:
        config: the ``tiers`` config group.

    Raises:
        TierConfigError: from the tiers' own checks; tiers already opened are closed again.
    """

    def __init__(self, config: TiersConfig) -> None:
        self.config = config
        self.scheduler = TransferScheduler(config.scheduler)
        self.tiers: Dict[str, Tier] = {}
        try:
            if config.host.enabled:
                self.tiers["host"] = HostTier(config.host, self.scheduler)
            if config.numa.enabled:
                self.tiers["numa"] = NumaTier(config.numa, self.scheduler)
            if config.nvme.enabled:
                self.tiers["nvme"] = NvmeTier(config.nvme, self.scheduler)
        except BaseException:
            self.close()
            raise

    @property
    def host(self) -> Optional[HostTier]:
        return self.tiers.get("host")  # type: ignore[return-value]

    @property
    def numa(self) -> Optional[NumaTier]:
        return self.tiers.get("numa")  # type: ignore[return-value]

    @property
    def nvme(self) -> Optional[NvmeTier]:
        return self.tiers.get("nvme")  # type: ignore[return-value]

    def __getitem__(self, kind: str) -> Tier:
        try:
            return self.tiers[kind]
        except KeyError:
            raise KeyError(f"tier {kind!r} is not enabled; enabled: {', '.join(self.tiers) or 'none'} "
                           f"(set tiers.{kind}.enabled=true)") from None

    def close(self) -> None:
        """Close every tier (removing swap files unless kept), then stop the scheduler. Idempotent."""
        try:
            self.scheduler.close()  # queued transfers are cancelled; running ones finish
        finally:
            for tier in reversed(list(self.tiers.values())):
                tier.close()

    def __enter__(self) -> "TierEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
