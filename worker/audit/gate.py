"""The audit gate: the rule a version must pass to go live, and the verdict the evidence supports.

Torch-free. The rule is written into the job's metrics before the numbers it is applied to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from worker.audit.evidence import GATING_ATTACKS, Evidence, PowerCheck

# Verdicts, from the strongest claim the evidence supports to a failure.
FORGOTTEN = "forgotten"  # the base model carried a membership signal; the new one carries none
NO_MEASURABLE_SIGNAL = "no_measurable_signal"  # not even the base model showed one: nothing to compare
INSUFFICIENT_POWER = "insufficient_power"  # too few samples for the test to see a signal
RESIDUAL_MEMBERSHIP = "residual_membership"  # the new model still treats samples as members
OVER_FORGETTING = "over_forgetting"  # it treats them as less likely members than never-seen data
UNCHANGED = "unchanged"  # the audited model is the base model, weight for weight: nothing was unlearned
# Too few never-seen samples to calibrate the test: nothing can be shown either way, so nothing is certified.
INSUFFICIENT_CONTROLS = "insufficient_controls"
# The base model showed a membership signal, but on the new version the test cannot flag samples it still
# holds (the power check): the version hides membership from the audit, so its silence certifies nothing.
UNVERIFIABLE = "unverifiable"
FAILING_VERDICTS = (INSUFFICIENT_CONTROLS, UNCHANGED, RESIDUAL_MEMBERSHIP, OVER_FORGETTING, UNVERIFIABLE)

# Per-sample outcomes, worst first: a subject's verdict is its worst sample's.
SAMPLE_MEMBER = "member"
SAMPLE_OVER_FORGOTTEN = "over_forgotten"
SAMPLE_CONSISTENT = "consistent_with_never_seen"


@dataclass(frozen=True)
class AuditRules:
    # Family-wise level of the membership rules, both directions and both attacks, over a request's samples.
    level: float = 0.05
    max_audit_drop: float = 2.0  # points of overall audit accuracy
    max_class_drop: float = 5.0  # points of one class's audit accuracy: a drop significantly beyond it fails
    min_samples: int = 20  # below this a request without a base signal is "insufficient power"
    min_controls: int = 100  # never-seen (audit) samples the test needs to calibrate against

    @property
    def direction_level(self) -> float:
        """Each direction's level (residual membership, over-forgetting): half the level, so that an exact
        retrain is turned down by the membership rules at most ``level`` of the time, both sides together."""
        return self.level / 2

    def describe(self) -> list[str]:
        return [
            f"residual membership: the per-sample LiRA test of the forgotten samples against never-seen "
            f"controls of the same difficulty (share beyond their upper 5 % tail by rank, binomial at its "
            f"exact null rate; the most extreme sample, Holm-corrected) must not be significant at level "
            f"{self.direction_level}; RMIA's test of the same samples is reported beside it, not gating",
            f"over-forgetting: the mirror test (beyond the controls' lower 5 % tail; the lowest sample) "
            f"must not be significant at level {self.direction_level} (the two directions together: "
            f"{self.level})",
            "power: where the model before unlearning showed a membership signal, the same test must flag, "
            "under the new model, samples it still holds matched to the forgotten ones in difficulty "
            f"(level {self.direction_level}); a version on which it cannot certifies nothing",
            "the audited model must differ from the base model",
            f"the audit split must hold at least {self.min_controls} never-seen samples to calibrate against",
            f"utility: overall audit accuracy may not drop significantly more than {self.max_audit_drop} "
            f"points (exact paired test of a drop beyond the bound, level {self.level})",
            f"utility per class: no class may lose significantly more than {self.max_class_drop} points on "
            f"never-seen data (exact paired test of a drop beyond the bound, level {self.level}, Bonferroni "
            f"over the classes)",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.describe()}


def sample_outcomes(evidence: Evidence, level: float) -> list[str]:
    """Each sample's outcome from LiRA's per-sample p-values (RMIA's ranks are too coarse to stand alone) at
    LiRA's share of one direction's ``level`` (``AuditRules.direction_level``): divided among the gating
    attacks, halved again for LiRA's two tests (Holm over the samples)."""
    member = evidence.lira.p_member_adjusted < level / (2 * len(GATING_ATTACKS))
    under = evidence.lira.p_under_adjusted < level / (2 * len(GATING_ATTACKS))
    return [
        SAMPLE_MEMBER if m else SAMPLE_OVER_FORGOTTEN if u else SAMPLE_CONSISTENT
        for m, u in zip(member, under, strict=True)
    ]


def verdict(
    before: Evidence,
    after: Evidence,
    rules: AuditRules,
    *,
    unchanged: bool,
    controls: int,
    power: PowerCheck | None,
) -> str:
    """``power`` None: not checked (a data subject's share of a request, read with the request's check)."""
    if controls < rules.min_controls:
        return INSUFFICIENT_CONTROLS
    if unchanged:
        return UNCHANGED
    if after.residual_p() < rules.direction_level:
        return RESIDUAL_MEMBERSHIP
    if after.over_forgetting_p() < rules.direction_level:
        return OVER_FORGETTING
    if before.residual_p() < rules.direction_level:
        return FORGOTTEN if power is None or power.detects() else UNVERIFIABLE
    return INSUFFICIENT_POWER if len(after) < rules.min_samples else NO_MEASURABLE_SIGNAL


def subject_verdicts(
    subjects: list[str | None], before: Evidence, after: Evidence, rules: AuditRules, request_verdict: str
) -> dict[str, dict[str, Any]]:
    """Per data subject: the request's test on the subject's samples alone, and the worst of its samples
    (a sample member-like within the whole request makes its subject's verdict residual membership)."""
    after_outcomes = sample_outcomes(after, rules.direction_level)
    result: dict[str, dict[str, Any]] = {}
    for subject in sorted({s for s in subjects if s is not None}):
        rows = [i for i, s in enumerate(subjects) if s == subject]
        own_before, own_after = before.subset(rows), after.subset(rows)
        outcomes = [after_outcomes[i] for i in rows]
        subject_verdict = verdict(
            own_before, own_after, rules, unchanged=False, controls=rules.min_controls, power=None
        )
        if subject_verdict == FORGOTTEN and request_verdict == UNVERIFIABLE:
            subject_verdict = UNVERIFIABLE  # the request's power check covers its subjects
        if SAMPLE_MEMBER in outcomes:
            subject_verdict = RESIDUAL_MEMBERSHIP
        elif SAMPLE_OVER_FORGOTTEN in outcomes and subject_verdict != RESIDUAL_MEMBERSHIP:
            subject_verdict = OVER_FORGETTING
        result[subject] = {
            "verdict": subject_verdict,
            "samples": len(rows),
            "member_share_before": round(float(own_before.lira.above_controls.mean()), 4),
            "member_share_after": round(float(own_after.lira.above_controls.mean()), 4),
            "residual_membership_p_before": float(f"{own_before.residual_p():.4g}"),
            "residual_membership_p_after": float(f"{own_after.residual_p():.4g}"),
            "members_after": outcomes.count(SAMPLE_MEMBER),
            "over_forgotten_after": outcomes.count(SAMPLE_OVER_FORGOTTEN),
        }
    return result


def gate(
    before: Evidence,
    after: Evidence,
    utility: dict[str, Any],
    rules: AuditRules,
    *,
    unchanged: bool,
    controls: int,
    power: PowerCheck,
) -> dict[str, Any]:
    """Apply every rule; ``failures`` says in words which failed and by how much."""
    failures: list[str] = []
    if controls < rules.min_controls:
        failures.append(
            f"the audit split holds {controls} never-seen samples; the membership test needs at least "
            f"{rules.min_controls} to calibrate against, so no evidence of erasure can be shown"
        )
    if unchanged:
        failures.append("the audited model is identical to the base model: nothing was unlearned")
    residual_p, under_p = after.residual_p(), after.over_forgetting_p()
    lira, rmia = after.lira, after.rmia
    if residual_p < rules.direction_level:
        failures.append(
            f"residual membership: {int(lira.above_controls.sum())} (LiRA) and "
            f"{int(rmia.above_controls.sum())} (RMIA) of {len(after)} forgotten samples score beyond "
            f"their never-seen controls' upper 5 % tail, p = {residual_p:.3g} < {rules.direction_level}"
        )
    if under_p < rules.direction_level:
        failures.append(
            f"over-forgetting: {int(lira.below_controls.sum())} (LiRA) and {int(rmia.below_controls.sum())} "
            f"(RMIA) of {len(after)} forgotten samples score beyond their never-seen controls' lower 5 % "
            f"tail, p = {under_p:.3g} < {rules.direction_level}"
        )
    signal_before = before.residual_p() < rules.direction_level
    if signal_before and not power.detects() and residual_p >= rules.direction_level:
        held = power.summary()
        failures.append(
            f"unverifiable: the test flags {held['held_member_share']} of {held['held_samples']} samples the "
            f"new model still holds (matched in difficulty), p = {held['held_residual_membership_p']} >= "
            f"{rules.direction_level}: on this version it cannot see membership, so no erasure can be shown"
        )
    overall = utility["overall"]
    if overall["beyond_bound_p"] < rules.level:
        failures.append(
            f"audit accuracy fell {overall['drop']} points on never-seen data ({overall['before']} -> "
            f"{overall['after']}): significantly more than {rules.max_audit_drop} points, paired p = "
            f"{overall['beyond_bound_p']:.3g} < {rules.level}"
        )
    classes = utility["per_class"]
    class_level = rules.level / max(1, len(classes))
    dropped = {label: block for label, block in classes.items() if block["beyond_bound_p"] < class_level}
    for label, block in dropped.items():
        failures.append(
            f"class {label} fell {block['drop']} points on never-seen data ({block['before']} -> "
            f"{block['after']}): significantly more than {rules.max_class_drop} points, paired p = "
            f"{block['beyond_bound_p']:.3g} < {class_level:.3g}"
        )
    worst = max(classes.values(), key=lambda block: block["drop"]) if classes else None
    return {
        "passed": not failures,
        "failures": failures,
        "residual_membership_p": float(f"{residual_p:.4g}"),
        "over_forgetting_p": float(f"{under_p:.4g}"),
        "audit_drop": overall["drop"],
        "largest_class_drop": None if worst is None else worst["drop"],
        "classes_dropped_significantly": sorted(dropped),
    }


def pooled_verdict(own: str, batch: str | None) -> tuple[str, str]:
    """A request's verdict and the evidence that covers it (``request`` or ``batch``), when its job audited
    the samples of all its requests together as well (``batch``). A request whose own samples cannot speak
    (no signal, too few) takes the batch's verdict, failures included: its samples are part of that
    evidence, and a version that still carries the batch's membership certifies none of it."""
    if batch is None or own in FAILING_VERDICTS or own == FORGOTTEN or batch == INSUFFICIENT_POWER:
        return own, "request"
    return batch, "batch"
