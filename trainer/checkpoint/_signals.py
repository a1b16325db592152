"""SIGTERM and SIGUSR1 for checkpointers: a handler only sets a bit; the checkpointer acts on it at
its next step (persist; after SIGTERM, persist and stop), never inside the handler."""

from __future__ import annotations

import signal
from typing import Any, Dict

__all__ = ["PERSIST", "STOP", "SignalFlags"]

STOP, PERSIST = 1, 2


class SignalFlags:
    """Installs the handlers (main thread only: elsewhere signals stay as they are) and keeps the bits."""

    def __init__(self) -> None:
        self.bits = 0
        self._old: Dict[int, Any] = {}
        for sig, bit in ((signal.SIGTERM, STOP), (signal.SIGUSR1, PERSIST)):
            try:
                self._old[sig] = signal.signal(sig, self._handler(bit))
            except ValueError:  # not the main thread
                pass

    def _handler(self, bit: int):
        def handler(signum, frame) -> None:
            self.bits |= bit
        return handler

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
