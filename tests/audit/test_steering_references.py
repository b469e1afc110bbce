"""A reference set's steering references: the audit's view (``judging``) never includes them, a calibrated
method's targets (``steering_set().targets``) come from them alone, and they survive storage and purges."""

from __future__ import annotations

import numpy as np
import pytest

from worker.audit.references import ReferenceSet, balanced_masks
from worker.engine.config import TrainingConfig

JUDGING, STEERING, SAMPLES, CONTROLS, CLASSES = 4, 4, 6, 3, 2


def _set() -> ReferenceSet:
    """Eight references: the audit's four score every train sample 0-3; the steering four 200 where they
    trained on it, and where they did not 100 (first pair) or 102 (second), so any mix-up shows."""
    k = JUDGING + STEERING
    members = balanced_masks(k, SAMPLES, np.random.default_rng(0))
    out = np.array([0, 0, 0, 0, 100, 100, 102, 102], dtype=float)[:, None]
    scores = np.where(members, 200.0, out)
    scores[:JUDGING] = np.arange(JUDGING)[:, None] + np.zeros(SAMPLES)
    return ReferenceSet(
        train_rows=np.arange(10, 10 + SAMPLES, dtype=np.int64),
        train_labels=np.zeros(SAMPLES, dtype=np.int64),
        audit_rows=np.arange(CONTROLS, dtype=np.int64),
        audit_labels=np.zeros(CONTROLS, dtype=np.int64),
        members=members,
        train_scores=scores,
        audit_logits=np.zeros((k, CONTROLS, CLASSES), dtype=np.float32),
        recipe=TrainingConfig(epochs=1),
        seed=0,
        build_seconds=8.0,
        reference_seconds=(1.0,) * k,
        steering=STEERING,
    )


def test_the_audit_reads_the_judging_references_only() -> None:
    refs = _set()
    judging = refs.judging()
    assert (judging.k, judging.steering) == (JUDGING, 0)
    assert judging.train_scores.max() < 100  # none of the steering references' scores
    assert judging.build_seconds == JUDGING
    with pytest.raises(ValueError, match="between 2 and 4"):
        refs.first(6)  # a prefix cannot reach into the steering references
    assert refs.describe()["references"] == JUDGING and refs.describe()["steering_references"] == STEERING


def test_targets_are_the_steering_references_out_median_plus_a_margin() -> None:
    refs = _set()
    steering = refs.steering_set()
    rows = np.array([12, 10])
    targets = steering.targets(rows)
    # Each sample is OUT in one steering reference of each pair: scores 100 and 102, median 101.
    assert targets.tolist() == [101.0, 101.0]
    spread = np.sqrt(steering.pooled_variance)
    assert steering.targets(rows, margin=0.5) == pytest.approx(targets + 0.5 * spread)
    with pytest.raises(KeyError):
        steering.targets(np.array([99]))
    with pytest.raises(ValueError, match="no steering references"):
        refs.judging().steering_set()


def test_steering_survives_storage_and_a_purge() -> None:
    refs = _set()
    again = ReferenceSet.from_bytes(refs.to_bytes())
    assert again.steering == STEERING and np.array_equal(again.train_scores, refs.train_scores)
    purged = again.without_train_rows(np.array([11]))
    assert purged.steering == STEERING and 11 not in purged.train_rows
    assert purged.steering_set().targets(np.array([10])).tolist() == [101.0]
