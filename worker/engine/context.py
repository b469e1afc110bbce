"""What every engine loop receives besides its data: runtime, progress sink, cancellation, seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.progress import CancellationToken, ProgressCallback, ProgressEvent
from worker.engine.runtime import CPU, Runtime


@dataclass
class RunContext:
    runtime: Runtime = CPU
    progress: ProgressCallback | None = None
    cancel: CancellationToken | None = None
    seed: int = 0

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run's seed; ``offset`` separates independent streams. The value
        is taken modulo 2**64 (torch's seed range), which leaves every seed below about 1.8e13 as it was and
        keeps large seeds (any 63-bit ``UnlearnConfig.seed``, Retrain's derived seed) from overflowing."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + offset) % 2**64)

    def step(
        self, step: int, total_steps: int, epoch: int, total_epochs: int, losses: dict[str, float]
    ) -> None:
        """Report one optimiser step and honour a pending cancellation."""
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        if self.progress is not None:
            self.progress(ProgressEvent(step, total_steps, epoch, total_epochs, losses))
