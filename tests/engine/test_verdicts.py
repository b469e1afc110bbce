"""The bars are computed from the records, so a doc's "met" cannot drift from its tables."""

from __future__ import annotations

from typing import Any

from worker.bench.verdicts import attack_halves_markdown, bars_markdown


def _record(method: str, seed: int, time_ratio: float, **metrics: float) -> dict[str, Any]:
    base = dict(train_r=99.0, train_f=0.0, test=88.0, test_r=98.0, test_f=0.0, asr=20.0, shadow_asr=25.0)
    parts = {"forget_called_member": 10.0, "heldout_called_nonmember": 30.0}
    return dict(method=method, setup="class", seed=seed, forget_frac=None, time_ratio=time_ratio,
                metrics={**base, **metrics}, asr_parts=parts, shadow_asr_parts=parts)  # fmt: skip


def test_bars_compare_means_with_retrain_and_say_not_met() -> None:
    records = [_record("retrain", s, 1.0) for s in range(2)]
    records += [_record("mixunlearn", 0, 0.1, test_r=96.5), _record("mixunlearn", 1, 0.1, test_r=97.5)]
    records += [_record("mixunlearn-agnostic", s, 0.5, train_f=3.0) for s in range(2)]
    table = bars_markdown(records)
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    # Mean Test_r 97.0 is 1.0 from Retrain's 98.0: met at the limit.
    assert "met (1.00: 97.00 vs 98.00; 2 seeds)" in rows["Test_r within 1.0 of Retrain"]
    assert rows["Train_f <= 1 %"].endswith("| met (0.00; 2 seeds) | **not met** (3.00; 2 seeds) |")
    assert rows["wall <= 40 % of Retrain"].endswith("| met (0.10; 2 seeds) | **not met** (0.50; 2 seeds) |")
    assert "data" not in {line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]}


def test_bars_judge_the_methods_named_and_say_what_was_not_measured() -> None:
    def unshadowed(method: str, seed: int) -> dict[str, Any]:
        record = _record(method, seed, 0.1 if method == "repair" else 1.0)
        record["metrics"]["shadow_asr"] = None  # lethe bench --shadow-models 0
        return record

    records = [unshadowed(method, seed) for method in ("retrain", "repair") for seed in range(2)]
    table = bars_markdown(records, ("repair",))
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert table.splitlines()[0] == "| setup | bar | repair |"
    assert rows["shadow-MIA ASR within 5 of Retrain"].endswith("| (not measured) |")
    assert rows["wall <= 40 % of Retrain"].endswith("| met (0.10; 2 seeds) |")


def test_attack_halves_are_the_means_of_the_recorded_parts() -> None:
    table = attack_halves_markdown(
        [_record("retrain", 0, 1.0, asr=18.0), _record("retrain", 1, 1.0, asr=22.0)]
    )
    assert "| class | retrain | 20.00 ± 2.83 | 10.0 | 30.0 | 25.00 ± 0.00 | 10.0 | 30.0 |" in table
