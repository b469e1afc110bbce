"""A small memorised-subject case on the digits: a realistic leak a no-op leaves in place.

400 train rows (and the 540 held-out digits as never-seen controls); one data subject of 30 samples, 10 of
them with a wrong label; the model trained on those labels until it predicts them (memorised, checked).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.datasets.builtin import BuiltinDataset, load_dataset
from worker.engine.config import TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.spec import ModelSpec
from worker.engine.training import predict_logits, train

SPEC = ModelSpec("mnist_cnn", 10, (1, 8, 8), "features.block2")
RECIPE = TrainingConfig(epochs=30, lr=3e-3)
SUBJECT = "subject-memorised"
SUBJECT_SIZE = 30
WRONG_LABELS = 10
REFERENCES = 8


@dataclass(frozen=True)
class MemorisedCase:
    dataset: BuiltinDataset  # labels as registered (the wrong ones included); train_rows: the 400
    subject_rows: np.ndarray
    flipped_rows: np.ndarray
    initial: nn.Module
    memorised: int  # flipped rows the initial model predicts with their wrong label

    def split(self, rows: np.ndarray) -> TensorSplit:
        index = torch.from_numpy(rows)
        return TensorSplit(
            torch.from_numpy(self.dataset.x)[index], torch.from_numpy(self.dataset.y[rows]), index
        )

    @property
    def remaining_rows(self) -> np.ndarray:
        return np.setdiff1d(self.dataset.train_rows, self.subject_rows)


def _dataset() -> tuple[BuiltinDataset, np.ndarray, np.ndarray]:
    digits = load_dataset("digits")
    rng = np.random.default_rng(0)
    train_rows = np.sort(rng.choice(digits.train_rows, 400, replace=False))
    subject = np.sort(rng.choice(train_rows, SUBJECT_SIZE, replace=False))
    flipped = subject[:WRONG_LABELS]
    y = digits.y.copy()
    y[flipped] = (y[flipped] + rng.integers(1, 10, WRONG_LABELS)) % 10
    dataset = BuiltinDataset(
        name="digits-memorised", x=digits.x, y=y, train_rows=train_rows, heldout_rows=digits.heldout_rows,
        num_classes=10, input_shape=(1, 8, 8), sample_ids=digits.sample_ids,
    )  # fmt: skip
    return dataset, subject, flipped


@functools.cache
def memorised_case() -> MemorisedCase:
    dataset, subject, flipped = _dataset()
    torch.manual_seed(0)
    initial = build_model(SPEC)
    rows = torch.from_numpy(dataset.train_rows)
    data = TensorSplit(torch.from_numpy(dataset.x)[rows], torch.from_numpy(dataset.y)[rows])
    train(initial, data, RECIPE, RunContext(seed=0))
    predictions = (
        predict_logits(initial, torch.from_numpy(dataset.x[flipped]), RunContext()).argmax(1).numpy()
    )
    return MemorisedCase(dataset, subject, flipped, initial, int((predictions == dataset.y[flipped]).sum()))
