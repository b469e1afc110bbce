"""The paper's unlearning setups as pure functions of the labels: who is forgotten and which labels the
initial model was trained with. Numpy only; every random choice is drawn from the given seed.

Row indices are dataset rows (indices into ``BuiltinDataset.x``); forget and retain partition ``train_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SETUPS: tuple[str, ...] = ("class", "data", "noisy", "random")

# Paper 5.3 / A.6 (after Shen et al. 2024).
DATA_CLASSES = (5, 6, 7, 8, 9)
DATA_FRACTION = 0.4
NOISY_CLASSES = (0, 1, 2, 3, 4)
NOISY_FRACTION = 0.6
DEFAULT_FORGET_FRAC = 0.02


@dataclass(frozen=True)
class Setup:
    name: str
    forget_rows: np.ndarray  # int64, sorted
    retain_rows: np.ndarray  # int64, sorted
    # Labels of every dataset row as the initial model saw them; they differ from the true labels only on the
    # noisy setup's forget rows. Train_f / Train_r are measured against these, Test against the true labels.
    train_labels: np.ndarray
    # None when no class is targeted (random): Test_r / Test_f are then undefined.
    forget_classes: frozenset[int] | None
    forget_frac: float | None = None  # the random setup's share of the training set


def _split(
    name: str,
    train_rows: np.ndarray,
    forget_rows: np.ndarray,
    train_labels: np.ndarray,
    forget_classes: frozenset[int] | None,
    forget_frac: float | None = None,
) -> Setup:
    forget_rows = np.sort(forget_rows).astype(np.int64)
    retain_rows = np.setdiff1d(train_rows, forget_rows).astype(np.int64)
    return Setup(name, forget_rows, retain_rows, train_labels, forget_classes, forget_frac)


def _sample_per_class(
    y: np.ndarray, train_rows: np.ndarray, classes: tuple[int, ...], fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """round(fraction * n_c) training rows of each class c, so every run forgets the same number per class."""
    picked = []
    for label in classes:
        rows = train_rows[y[train_rows] == label]
        picked.append(rng.choice(rows, size=round(fraction * len(rows)), replace=False))
    return np.concatenate(picked)


def class_setup(y: np.ndarray, train_rows: np.ndarray, forget_class: int = 0) -> Setup:
    """Forget every training sample of ``forget_class`` (paper 5.3: class 0)."""
    forget = train_rows[y[train_rows] == forget_class]
    return _split("class", train_rows, forget, y, frozenset({forget_class}))


def data_setup(y: np.ndarray, train_rows: np.ndarray, seed: int) -> Setup:
    """Forget 40 % of the training samples of each of classes 5-9 (paper 5.3)."""
    rng = np.random.default_rng(seed)
    forget = _sample_per_class(y, train_rows, DATA_CLASSES, DATA_FRACTION, rng)
    return _split("data", train_rows, forget, y, frozenset(DATA_CLASSES))


def noisy_setup(y: np.ndarray, train_rows: np.ndarray, num_classes: int, seed: int) -> Setup:
    """60 % of the training samples of each of classes 0-4 get a uniformly random wrong label; the initial
    model trains on those labels and the mislabelled samples are the forget set (paper A.6). Retain keeps
    clean labels."""
    rng = np.random.default_rng(seed)
    forget = _sample_per_class(y, train_rows, NOISY_CLASSES, NOISY_FRACTION, rng)
    labels = y.copy()
    # A shift in 1..K-1 modulo K is uniform over the K-1 wrong labels and never the true one.
    labels[forget] = (y[forget] + rng.integers(1, num_classes, size=len(forget))) % num_classes
    return _split("noisy", train_rows, forget, labels, frozenset(NOISY_CLASSES))


def random_setup(y: np.ndarray, train_rows: np.ndarray, forget_frac: float, seed: int) -> Setup:
    """Forget a uniformly random ``forget_frac`` of the training set (at least one sample), any class."""
    if not 0.0 < forget_frac < 1.0:
        raise ValueError(f"forget_frac must be in (0, 1), got {forget_frac}")
    size = max(1, round(forget_frac * len(train_rows)))
    forget = np.random.default_rng(seed).choice(train_rows, size=size, replace=False)
    return _split("random", train_rows, forget, y, None, forget_frac)


def build_setup(
    name: str,
    y: np.ndarray,
    train_rows: np.ndarray,
    num_classes: int,
    *,
    seed: int,
    forget_class: int = 0,
    forget_frac: float = DEFAULT_FORGET_FRAC,
) -> Setup:
    if name == "class":
        return class_setup(y, train_rows, forget_class)
    if name == "data":
        return data_setup(y, train_rows, seed)
    if name == "noisy":
        return noisy_setup(y, train_rows, num_classes, seed)
    if name == "random":
        return random_setup(y, train_rows, forget_frac, seed)
    raise ValueError(f"unknown setup {name!r}; known: {', '.join(SETUPS)}")
