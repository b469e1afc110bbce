"""Utility on never-seen data, before and after: overall and per class, paired on the same audit samples."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

Z95 = 1.959964


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy, in percent."""
    if n == 0:
        return (0.0, 100.0)
    p = correct / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return (round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2))


def paired_drop_p(before: np.ndarray, after: np.ndarray) -> float:
    """One-sided exact sign test (McNemar) that accuracy dropped: of the samples whose correctness changed,
    more went right -> wrong than wrong -> right."""
    lost = int(np.sum(before & ~after))
    gained = int(np.sum(~before & after))
    if lost + gained == 0:
        return 1.0
    return float(stats.binom.sf(lost - 1, lost + gained, 0.5))


def utility_comparison(
    labels: np.ndarray, before_predictions: np.ndarray, after_predictions: np.ndarray
) -> dict[str, Any]:
    """Accuracy in percent with 95 % intervals, overall and per class, before and after; per class the drop
    in points and its paired one-sided p-value."""
    before, after = before_predictions == labels, after_predictions == labels

    def block(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        b, a = int(before[mask].sum()), int(after[mask].sum())
        return {
            "samples": n,
            "before": round(100 * b / n, 2),
            "after": round(100 * a / n, 2),
            "before_interval": wilson_interval(b, n),
            "after_interval": wilson_interval(a, n),
            "drop": round(100 * (b - a) / n, 2),
            "drop_p": float(f"{paired_drop_p(before[mask], after[mask]):.4g}"),
        }

    every = np.ones(len(labels), dtype=bool)
    return {
        "overall": block(every),
        "per_class": {str(int(c)): block(labels == c) for c in np.unique(labels)},
    }
