"""SIGINT and SIGTERM during training: finish the step, save a checkpoint with training state, stop."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopSignal", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint with training state was saved first."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a step is never cut in half;
    a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
