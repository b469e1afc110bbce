"""The audit's building blocks on synthetic numbers: the score, the masks, the corrections, the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.audit.evidence import Evidence, PowerCheck, both_attacks, detectable_share, matched_held_rows
from worker.audit.gate import AuditRules, gate, pooled_verdict, verdict
from worker.audit.membership import (
    MATCHED_CONTROLS,
    beyond_tail,
    binomial_tail,
    holm,
    membership_test,
    tail_rate,
)
from worker.audit.references import ReferenceSet, balanced_masks
from worker.audit.rmia import rmia_test
from worker.audit.run import with_batch_evidence
from worker.audit.scores import stable_logit, stable_logit_all_labels
from worker.audit.utility import paired_drop_p, utility_comparison, wilson_interval
from worker.engine.config import TrainingConfig


def test_stable_logit_is_log_odds_of_the_label_and_does_not_saturate() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [80.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    phi = stable_logit(logits, labels)
    p = torch.softmax(logits.double(), 1)
    naive = torch.log(p[[0, 1], labels[:2]]) - torch.log(1 - p[[0, 1], labels[:2]])
    assert torch.allclose(phi[:2], naive)
    # p_y = 1 - 2e-35 is 1.0 in float: the naive log-odds is inf, phi stays finite and ordered.
    assert torch.isfinite(phi[2]) and phi[2] > 79
    every = stable_logit_all_labels(logits.numpy())
    assert np.allclose(every[np.arange(3), labels.numpy()], phi.numpy())


def test_masks_put_every_sample_in_exactly_half_the_references() -> None:
    masks = balanced_masks(16, 1000, np.random.default_rng(0))
    assert (masks.sum(axis=0) == 8).all()
    # Complementary pairs: every sample is in exactly one reference of each pair, so any prefix of whole
    # pairs (the audit at K = 4 reads the first four of a larger set) is balanced too.
    assert (masks[0::2] ^ masks[1::2]).all()
    assert (masks[:4].sum(axis=0) == 2).all()
    assert masks.sum(axis=1).min() > 400 and masks.sum(axis=1).max() < 600
    with pytest.raises(ValueError, match="even"):
        balanced_masks(5, 10, np.random.default_rng(0))


def test_holm_and_binomial_tail() -> None:
    adjusted = holm(np.array([0.01, 0.04, 0.03, 0.5]))
    assert np.allclose(adjusted, [0.04, 0.09, 0.09, 0.5])
    assert binomial_tail(0, 50, 0.05) == pytest.approx(1.0)
    assert binomial_tail(10, 50, 0.05) < 0.01 < binomial_tail(5, 50, 0.05)


def test_the_share_test_holds_its_level_whatever_the_controls_tails() -> None:
    """Never-seen samples drawn like their controls, from heavy tails (Student-t, 3 degrees of freedom), each
    read against the 50 of 500 controls nearest its difficulty (so samples of one difficulty share most of
    theirs, as a subject's samples do): the rank rule puts 2 in 51 of them beyond a tail, and the share test
    rejects at most at its level. The rule it replaced (t > 1.645 after standardising by the controls'
    median and MAD) put about 8 % beyond it, and rejected about 10 % of such requests at the same level."""
    rng = np.random.default_rng(0)
    trials, m, level = 4000, 50, 0.0125
    difficulty, wanted = rng.uniform(0, 1, 500), rng.uniform(0, 1, m)
    nearest = np.argsort(np.abs(difficulty[None, :] - wanted[:, None]), axis=1)[:, :MATCHED_CONTROLS]
    rate = tail_rate(MATCHED_CONTROLS)
    assert rate == pytest.approx(2 / 51)
    flagged, rejected = 0, 0
    for _ in range(trials):  # a new version: new scores for the controls and the samples
        scores, values = rng.standard_t(3, 500), rng.standard_t(3, m)
        above = sum(beyond_tail(float(v), scores[near])[0] for v, near in zip(values, nearest, strict=True))
        flagged += above
        rejected += binomial_tail(above, m, rate) < level
    assert flagged / (trials * m) == pytest.approx(rate, abs=0.003)
    assert rejected / trials <= level


CLASSES = 5


class Synthetic:
    """References whose train scores are a per-sample difficulty plus noise (members 2 higher), and whose
    audit logits favour each control's own class by a difficulty of the same spread; an audited model draws
    from the same process as a reference that never saw the sample, 0.5 more confident (it saw more data)."""

    def __init__(self, rng: np.random.Generator, k: int = 16, n_train: int = 600, n_audit: int = 500) -> None:
        self.rng = rng
        self.difficulty = rng.normal(4.0, 2.0, n_train)
        self.audit_difficulty = rng.normal(6.0, 2.0, n_audit)
        self.audit_labels = rng.integers(0, CLASSES, n_audit)
        members = balanced_masks(k, n_train, rng)
        self.refs = ReferenceSet(
            train_rows=np.arange(n_train), train_labels=rng.integers(0, CLASSES, n_train),
            audit_rows=np.arange(n_train, n_train + n_audit), audit_labels=self.audit_labels, members=members,
            train_scores=self.difficulty + rng.normal(0, 1, (k, n_train)) + 2.0 * members,
            audit_logits=np.stack([self._audit_logits(0.0) for _ in range(k)]).astype(np.float32),
            recipe=TrainingConfig(), seed=0, build_seconds=0.0,
        )  # fmt: skip

    def _audit_logits(self, shift: float) -> np.ndarray:
        n = len(self.audit_labels)
        logits = self.rng.normal(0, 0.3, (n, CLASSES))
        logits[np.arange(n), self.audit_labels] += self.audit_difficulty + shift + self.rng.normal(0, 1, n)
        return logits

    def audited(self, rows: np.ndarray, forget_shift: float) -> tuple[np.ndarray, np.ndarray]:
        """Its phi on the forgotten ``rows`` (``forget_shift`` above a never-seen sample's) and its audit
        logits."""
        forget = self.difficulty[rows] + 0.5 + forget_shift + self.rng.normal(0, 1, len(rows))
        return forget, self._audit_logits(0.5)


# Each attack on its own draw, with the AUC and TPR at 1 % FPR it must reach on members. RMIA's are read from
# ranks among 50 matched controls, too coarse for a 1 % tail: only its AUC is asked for.
ATTACKS = {"lira": (membership_test, 1, 0.9, 0.5), "rmia": (rmia_test, 5, 0.8, 0.0)}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize(
    ("shift", "residual", "under"), [(0.0, False, False), (3.0, True, False), (-3.0, False, True)]
)
def test_each_attack_separates_members_never_seen_and_over_forgotten(
    attack: str, shift: float, residual: bool, under: bool
) -> None:
    run, seed, min_auc, min_tpr = ATTACKS[attack]
    synthetic = Synthetic(np.random.default_rng(seed))
    rows = np.sort(synthetic.rng.choice(600, 50, replace=False))
    test = run(synthetic.refs, rows, *synthetic.audited(rows, shift))
    summary = test.summary()
    assert (test.residual_p() < 1e-3) == residual, summary
    assert (test.over_forgetting_p() < 1e-3) == under, summary
    assert ((test.p_member > 0) & (test.p_member <= 1)).all()
    if not residual and not under:
        assert test.residual_p() > 0.05 and test.over_forgetting_p() > 0.05, summary
        assert 0.35 < summary["auc"] < 0.65
    if residual:
        assert summary["auc"] > min_auc and summary["tpr_at_1pct_fpr"] >= min_tpr


def _evidence(synthetic: Synthetic, rows: np.ndarray, shift: float) -> Evidence:
    return both_attacks(synthetic.refs, rows, *synthetic.audited(rows, shift))


def test_verdicts_say_no_more_than_the_evidence() -> None:
    synthetic = Synthetic(np.random.default_rng(2))
    rows = np.sort(synthetic.rng.choice(600, 50, replace=False))
    member, never_seen = _evidence(synthetic, rows, 3.0), _evidence(synthetic, rows, 0.0)
    rules = AuditRules()
    sees, blind = PowerCheck(member, never_seen, 0.025), PowerCheck(never_seen, never_seen, 0.025)

    def read(before: Evidence, after: Evidence) -> str:
        return verdict(before, after, rules, unchanged=False, controls=500, power=sees)

    assert read(member, never_seen) == "forgotten"
    assert read(never_seen, never_seen) == "no_measurable_signal"
    assert read(member, member) == "residual_membership"
    assert verdict(never_seen, never_seen, rules, unchanged=True, controls=500, power=sees) == "unchanged"
    assert verdict(member, never_seen, rules, unchanged=False, controls=99, power=sees) == (
        "insufficient_controls"
    )
    # The version's power check cannot flag samples it holds: the silence on the forgotten ones certifies
    # nothing, though the base model showed a signal.
    assert verdict(member, never_seen, rules, unchanged=False, controls=500, power=blind) == "unverifiable"
    few = rows[:10]
    small = _evidence(synthetic, few, 0.0)
    assert verdict(small, small, rules, unchanged=False, controls=500, power=sees) == "insufficient_power"


def test_a_small_request_takes_its_batch_evidence_where_its_own_cannot_speak() -> None:
    assert pooled_verdict("insufficient_power", "forgotten") == ("forgotten", "batch")
    assert pooled_verdict("no_measurable_signal", "residual_membership") == ("residual_membership", "batch")
    assert pooled_verdict("insufficient_power", "insufficient_power") == ("insufficient_power", "request")
    assert pooled_verdict("residual_membership", "forgotten") == ("residual_membership", "request")
    assert pooled_verdict("forgotten", "over_forgetting") == ("forgotten", "request")
    assert pooled_verdict("insufficient_power", None) == ("insufficient_power", "request")
    # What the share test can see: 3 of 5 samples member-like, 7 of 50 (one direction, LiRA's two tests).
    assert detectable_share(5, 0.025) == 0.6 and detectable_share(50, 0.025) == 0.14


def test_the_power_check_matches_held_samples_in_difficulty() -> None:
    synthetic = Synthetic(np.random.default_rng(6))
    refs = synthetic.refs
    forget = np.sort(synthetic.rng.choice(600, 20, replace=False))
    held = matched_held_rows(refs, forget, np.arange(600), per_sample=2)
    assert len(held) == 40 and len(np.unique(held)) == 40 and not np.isin(held, forget).any()
    out_median = np.nanmedian(np.where(refs.members, np.nan, refs.train_scores), axis=0)
    gap = np.abs(np.median(out_median[held]) - np.median(out_median[forget]))
    assert gap < 0.5 < np.std(out_median)


def test_utility_flags_only_a_class_drop_significantly_beyond_the_bound() -> None:
    labels = np.repeat([0, 1, 2], 100)
    before = labels.copy()
    before[150:152] = 0  # class 1 starts at 98
    after = labels.copy()
    after[:30] = 1  # class 0: 100 -> 70, thirty lost: far beyond 5 points
    after[100:115] = 0  # class 1: 98 -> 85, fifteen lost and two gained: beyond 5, not significantly
    after[200:203] = 0  # class 2: 100 -> 97
    utility = utility_comparison(labels, before, after, class_bound=5.0, overall_bound=2.0)
    per_class = utility["per_class"]
    # Overall 99.33 -> 84.0: 48 lost, 2 gained of 300, far beyond 2 points; a bound that asks for a rise
    # (as a test forcing a rejection sets it) is missed even by a model that changed nothing.
    assert utility["overall"]["drop"] == 15.33 and utility["overall"]["beyond_bound_p"] < 1e-6
    assert paired_drop_p(before == labels, before == labels, -1.0) == 0.0
    assert (per_class["0"]["drop"], per_class["1"]["drop"], per_class["2"]["drop"]) == (30.0, 13.0, 3.0)
    assert per_class["1"]["drop_p"] < 0.01 < 0.05 / 3 < per_class["1"]["beyond_bound_p"]
    assert per_class["0"]["beyond_bound_p"] < 1e-6 and per_class["2"]["beyond_bound_p"] == 1.0
    assert paired_drop_p(np.ones(12, bool), np.zeros(12, bool)) == pytest.approx(0.5**12)  # McNemar
    low, high = wilson_interval(88, 100)
    assert low < 88 < high
    synthetic = Synthetic(np.random.default_rng(3))
    rows = np.sort(synthetic.rng.choice(600, 50, replace=False))
    test = _evidence(synthetic, rows, 0.0)
    power = PowerCheck(test, test, 0.025)
    decision = gate(
        test, test, utility, AuditRules(max_class_drop=5.0), unchanged=False, controls=500, power=power
    )
    assert decision["classes_dropped_significantly"] == ["0"] and not decision["passed"]
    assert any("class 0 fell 30.0 points" in failure for failure in decision["failures"])


def test_reference_set_round_trips_through_bytes() -> None:
    refs = Synthetic(np.random.default_rng(4), k=4, n_train=20, n_audit=10).refs
    again = ReferenceSet.from_bytes(refs.to_bytes())
    assert again.describe() == refs.describe()
    for name in (
        "train_rows",
        "train_labels",
        "audit_rows",
        "audit_labels",
        "members",
        "train_scores",
        "audit_logits",
    ):
        assert np.array_equal(getattr(again, name), getattr(refs, name)), name
    with pytest.raises(KeyError, match="not in the reference set"):
        refs.train_columns(np.array([3, 999]))


def test_a_single_sample_request_is_tested_and_says_so_when_it_cannot_tell() -> None:
    synthetic = Synthetic(np.random.default_rng(5))
    row = np.array([17])
    test = _evidence(synthetic, row, 0.0)
    assert len(test) == 1 and np.isfinite(test.lira.t).all()
    summary = test.summary()
    assert summary["samples"] == 1 and 0 <= summary["combined"]["residual_membership_p"] <= 1
    power = PowerCheck(None, test, 0.025)
    assert (
        verdict(test, test, AuditRules(), unchanged=False, controls=500, power=power) == "insufficient_power"
    )
    leaked = _evidence(synthetic, row, 12.0)
    assert verdict(leaked, leaked, AuditRules(), unchanged=False, controls=500, power=power) == (
        "residual_membership"
    )


def _audit_dict(verdict_name: str, samples: int, failures: list[str]) -> dict[str, object]:
    return {
        "verdict": verdict_name,
        "evidence": {"scope": "request", "samples": samples, "detectable_member_share": 0.5},
        "gate": {"passed": not failures, "failures": failures},
        "membership": {}, "power": {},
    }  # fmt: skip


def test_a_request_reads_its_jobs_pooled_audit_where_its_own_samples_cannot_speak() -> None:
    small = _audit_dict("insufficient_power", 5, [])
    leaking_batch = _audit_dict("residual_membership", 50, ["residual membership: 9 of 50 ..."])
    combined = with_batch_evidence(small, leaking_batch)
    assert combined["verdict"] == "residual_membership" and not combined["gate"]["passed"]
    assert combined["evidence"]["scope"] == "batch" and combined["evidence"]["batch"]["samples"] == 50
    assert "pooled audit of 50 samples" in combined["gate"]["failures"][-1]
    forgotten = with_batch_evidence(small, _audit_dict("forgotten", 50, []))
    assert forgotten["verdict"] == "forgotten" and forgotten["gate"]["passed"]
    own = with_batch_evidence(_audit_dict("forgotten", 25, []), leaking_batch)
    assert own["verdict"] == "forgotten" and own["evidence"]["scope"] == "request"
