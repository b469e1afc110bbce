"""Progress reporting and cooperative cancellation for long engine runs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgressEvent:
    step: int  # optimiser steps done so far (1-based)
    total_steps: int
    epoch: int  # 1-based
    total_epochs: int
    losses: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


class UnlearningCancelled(Exception):
    """Raised inside the engine when its cancellation token is set; the input model is left untouched."""


class CancellationToken:
    """Set from anywhere (another thread, a poller reading the job row); the engine checks it every step."""

    def __init__(self, is_cancelled: Callable[[], bool] | None = None) -> None:
        self._event = threading.Event()
        self._poll = is_cancelled

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self._poll is not None and self._poll():
            self._event.set()
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise UnlearningCancelled("unlearning cancelled")
