"""SIGINT / SIGTERM during training: finish the current step, checkpoint, then stop.

The handler only sets a flag; the training loop checks it after each step, so a stop never lands
half-way through an optimiser update or a file write. A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set `.signum` instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        # Python allows signal handlers only in the main thread; elsewhere the defaults stay.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        """SIGINT / SIGTERM, for messages."""
        return signal.Signals(self.signum).name if self.signum is not None else ""
