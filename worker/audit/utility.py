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


def paired_drop_p(before: np.ndarray, after: np.ndarray, bound: float = 0.0) -> float:
    """One-sided exact test that accuracy dropped by more than ``bound`` (a fraction) on these samples.

    Conditional on the d samples whose correctness changed, the number that went right -> wrong is
    Binomial(d, pi); a drop of at most ``bound`` means pi <= (bound * n + d) / (2 d). ``bound = 0`` is the
    exact McNemar (sign) test."""
    n = len(before)
    lost = int(np.sum(before & ~after))
    discordant = lost + int(np.sum(~before & after))
    if discordant == 0:  # nothing changed: beyond the bound only if it asks for a rise
        return 0.0 if bound < 0 else 1.0
    pi = (bound * n + discordant) / (2 * discordant)
    if pi <= 0.0:
        return 0.0
    if pi >= 1.0:
        return 1.0
    return float(stats.binom.sf(lost - 1, discordant, pi))


def utility_comparison(
    labels: np.ndarray,
    before_predictions: np.ndarray,
    after_predictions: np.ndarray,
    class_bound: float,
    overall_bound: float,
) -> dict[str, Any]:
    """Accuracy in percent with 95 % intervals, overall and per class, before and after; each with the drop
    in points, the paired p-value that it dropped at all (``drop_p``) and that it dropped by more than its
    bound (``beyond_bound_p``: ``overall_bound`` points overall, ``class_bound`` per class)."""
    before, after = before_predictions == labels, after_predictions == labels

    def block(mask: np.ndarray, bound: float) -> dict[str, Any]:
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
            "beyond_bound_p": float(f"{paired_drop_p(before[mask], after[mask], bound / 100):.4g}"),
        }

    every = np.ones(len(labels), dtype=bool)
    return {
        "overall": block(every, overall_bound),
        "per_class": {str(int(c)): block(labels == c, class_bound) for c in np.unique(labels)},
    }
