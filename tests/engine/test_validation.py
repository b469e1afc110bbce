"""The validation study's scoring: the rule in worker.bench.validation picks the candidate it says it does."""

from __future__ import annotations

from typing import Any

import pytest

from worker.bench.validation import GROUPS, REFERENCES, chosen, evaluate, format_markdown

RETRAIN = dict(train_r=99.0, train_f=0.0, test=88.0, test_r=98.0, test_f=0.0, asr=20.0)


def _records(candidate: str, method: str, wall_s: float, **metrics: float) -> list[dict[str, Any]]:
    return [
        dict(candidate=candidate, group=group.name, method=method, seed=5 + seed, wall_s=wall_s,
             metrics={**RETRAIN, **metrics})
        for group in GROUPS
        for seed in range(group.seeds)
        if group.label_agnostic_too or method != "mixunlearn-agnostic"
    ]  # fmt: skip


def _candidate(name: str, wall_s: float = 3.0, **metrics: float) -> list[dict[str, Any]]:
    return _records(name, "mixunlearn", wall_s, **metrics) + _records(
        name, "mixunlearn-agnostic", wall_s, **metrics
    )


REFERENCE_RECORDS = _records(REFERENCES, "retrain", 30.0)


def test_lowest_gap_among_qualifying_candidates_wins() -> None:
    results = evaluate(
        REFERENCE_RECORDS
        + _candidate("close", test_r=97.0)  # gap 1/3 on class groups, 0 elsewhere
        + _candidate("closer-but-slow", wall_s=15.0, test_r=97.9)  # 0.5x Retrain: over the 0.4 bar
        + _candidate("leaves-the-class", test_r=98.0, train_f=2.0)  # class Train_f 2 > 1: does not forget
    )
    by_name = {r.candidate: r for r in results}
    assert by_name["close"].score == pytest.approx((1 / 3 * 4 + 0 * 3) / 7)
    assert by_name["closer-but-slow"].max_time_ratio == pytest.approx(0.5)
    assert not by_name["closer-but-slow"].qualifies and not by_name["leaves-the-class"].qualifies
    winner = chosen(results)
    assert winner is not None and winner.candidate == "close"
    assert "close (chosen)" in format_markdown(results)


def test_missing_seeds_disqualify_and_missing_references_are_an_error() -> None:
    partial = [r for r in _candidate("partial") if r["seed"] != 7]
    (result,) = evaluate(REFERENCE_RECORDS + partial)
    assert not result.seeds_complete and not result.qualifies
    with pytest.raises(ValueError, match="no Retrain references"):
        evaluate(_candidate("orphan"))


def test_the_time_bar_covers_the_class_and_data_groups_only() -> None:
    slow_on_noisy = [
        {**r, "wall_s": 20.0} if r["group"] == "noisy" else r for r in _candidate("slow-on-noisy")
    ]
    (result,) = evaluate(REFERENCE_RECORDS + slow_on_noisy)
    assert result.max_time_ratio == pytest.approx(0.1) and result.qualifies
