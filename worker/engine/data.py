"""In-memory datasets the engine works on: preprocessed float tensors plus optional labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSplit:
    """Rows of one dataset split.

    ``x``: (N, C, H, W) float32, already normalised (the test-time transform applied). ``y``: (N,) int64, or
    None for label-agnostic data. ``index``: the rows' positions in the source dataset, for traceability.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    index: torch.Tensor | None = None
    # (N,) float: per row, the score (phi at its label) models that never trained on it give, from steering
    # references the audit never reads; only a steered method (``calibrated``) reads it.
    targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y is not None and self.y.shape != (self.x.shape[0],):
            raise ValueError(f"y must have shape ({self.x.shape[0]},), got {tuple(self.y.shape)}")
        if self.targets is not None and self.targets.shape != (self.x.shape[0],):
            raise ValueError(f"targets must have shape ({self.x.shape[0]},), got {tuple(self.targets.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, rows: torch.Tensor) -> TensorSplit:
        return TensorSplit(
            self.x[rows],
            None if self.y is None else self.y[rows],
            None if self.index is None else self.index[rows],
            None if self.targets is None else self.targets[rows],
        )

    def require_labels(self) -> torch.Tensor:
        if self.y is None:
            raise ValueError("this method is label-aware and the data carries no labels")
        return self.y
