"""Both attacks on one set of samples under one model, and the power check each version gets.

``Evidence`` holds the LiRA test and the RMIA test of the same samples. Both are in every report; the verdict
reads the attacks in ``GATING_ATTACKS``, the worse of them with a Bonferroni factor (their number), so it
keeps the configured family-wise level. RMIA is reported and does not gate: on the held-out calibration
seeds it turned down exact retrains (alone, it accepted 5 of 10 on mnist5k seed 3 at K = 4, where LiRA
accepted 9; docs/audit.md), and an attack that rejects the gold standard cannot decide what is erased.

``PowerCheck``: the same test, under the same version, on samples it still holds, matched one to one to the
request's samples in difficulty (their OUT references' median score at their label), and on never-seen
samples. How often it flags the held ones is what the audit can see on this version; a version on which it
cannot flag samples it holds certifies nothing. The held samples are chosen from the reference scores alone,
never from the audited model's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.audit.membership import (
    MATCHED_CONTROLS,
    SPREAD_PRIOR,
    MembershipTest,
    Query,
    binomial_tail,
    membership_test,
    tail_rate,
)
from worker.audit.references import ReferenceSet
from worker.audit.rmia import RankTest, rmia_test
from worker.audit.scores import stable_logit_all_labels

# The attacks whose tests decide the verdict; each one's p-value is multiplied by their number.
GATING_ATTACKS: tuple[str, ...] = ("lira",)


@dataclass(frozen=True)
class Evidence:
    lira: MembershipTest
    rmia: RankTest

    def __len__(self) -> int:
        return len(self.lira)

    def subset(self, rows: list[int]) -> Evidence:
        return Evidence(self.lira.subset(rows), self.rmia.subset(rows))

    def _gating(self) -> list[MembershipTest | RankTest]:
        return [getattr(self, attack) for attack in GATING_ATTACKS]

    def residual_p(self) -> float:
        return min(1.0, len(GATING_ATTACKS) * min(test.residual_p() for test in self._gating()))

    def over_forgetting_p(self) -> float:
        return min(1.0, len(GATING_ATTACKS) * min(test.over_forgetting_p() for test in self._gating()))

    def summary(self) -> dict[str, Any]:
        """LiRA's summary at the top (the per-sample attack the report's figures draw), RMIA's beside it,
        and the gating attacks combined: the p-values the verdict reads."""
        return {
            **self.lira.summary(),
            "rmia": self.rmia.summary(),
            "combined": {
                "gating_attacks": list(GATING_ATTACKS),
                "residual_membership_p": float(f"{self.residual_p():.4g}"),
                "over_forgetting_p": float(f"{self.over_forgetting_p():.4g}"),
            },
        }


def both_attacks(
    refs: ReferenceSet,
    rows: np.ndarray,
    model_scores: np.ndarray,
    model_audit_logits: np.ndarray,
    *,
    seed: int = 0,
    spread_prior: float | None = None,
) -> Evidence:
    """LiRA and RMIA on train ``rows`` (phi ``model_scores`` there) under one model."""
    lira = membership_test(
        refs, rows, model_scores, model_audit_logits, seed=seed,
        spread_prior=SPREAD_PRIOR if spread_prior is None else spread_prior,
    )  # fmt: skip
    return Evidence(lira, rmia_test(refs, rows, model_scores, model_audit_logits))


def detectable_share(samples: int, level: float) -> float | None:
    """The smallest share of member-like samples (beyond their matched controls' upper tail) that the share
    test flags among ``samples`` at ``level`` (its Bonferroni halves included): what the audit could see."""
    rate = tail_rate(MATCHED_CONTROLS)
    for k in range(1, samples + 1):
        if len(GATING_ATTACKS) * 2 * binomial_tail(k, samples, rate) < level:
            return round(k / samples, 4)
    return None


HELD_PER_SAMPLE = 4  # held samples matched to each forgotten one: the power check's own sampling error small


def matched_held_rows(
    refs: ReferenceSet, forget_rows: np.ndarray, candidates: np.ndarray, per_sample: int = HELD_PER_SAMPLE
) -> np.ndarray:
    """For each forgotten row, ``per_sample`` distinct candidates (train rows the version still holds) whose
    OUT references' median score is nearest its own, greedily, hardest forgotten samples first."""
    candidates = np.intersect1d(candidates, refs.train_rows)
    candidates = np.setdiff1d(candidates, forget_rows)
    if len(candidates) == 0:
        return np.empty(0, dtype=np.int64)
    difficulty = np.nanmedian(np.where(refs.members, np.nan, refs.train_scores), axis=0)
    wanted = difficulty[refs.train_columns(forget_rows)]
    pool = difficulty[refs.train_columns(candidates)]
    free = np.ones(len(candidates), bool)
    chosen: list[int] = []
    for i in np.tile(np.argsort(wanted), per_sample):
        if not free.any():
            break
        distance = np.where(free, np.abs(pool - wanted[i]), np.inf)
        j = int(np.argmin(distance))
        free[j] = False
        chosen.append(int(candidates[j]))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def never_seen_evidence(
    refs: ReferenceSet, model_audit_logits: np.ndarray, samples: int, seed: int
) -> Evidence:
    """The test on ``samples`` never-seen samples (each given a random train sample's OUT mask, scored at its
    own label, and read against the other controls): a sample the version never saw, by construction."""
    rng = np.random.default_rng(seed)
    n_audit = len(refs.audit_rows)
    picked = np.sort(rng.choice(n_audit, size=min(samples, n_audit), replace=False))
    masks = ~refs.members[:, rng.integers(0, refs.members.shape[1], len(picked))]
    labels = refs.audit_labels[picked]
    reference_scores = refs.audit_scores[:, picked, labels]  # (K, n)
    model_scores = stable_logit_all_labels(model_audit_logits)[picked, labels]
    query = Query(out=masks, labels=labels, reference_scores=reference_scores, exclude_controls=picked)
    rows = refs.audit_rows[picked]
    lira = membership_test(refs, rows, model_scores, model_audit_logits, seed=seed, query=query)
    return Evidence(lira, rmia_test(refs, rows, model_scores, model_audit_logits, query=query))


@dataclass(frozen=True)
class PowerCheck:
    held: Evidence | None  # the version on samples it still holds, matched in difficulty
    never_seen: Evidence  # the version on samples it never saw
    level: float

    def detects(self) -> bool:
        """The test flags the held samples as members: it can see membership on this version."""
        return self.held is not None and self.held.residual_p() < self.level

    def summary(self) -> dict[str, Any]:
        held = self.held
        return {
            "detects_held_members": self.detects(),
            "held_samples": 0 if held is None else len(held),
            "held_member_share": None if held is None else round(float(held.lira.above_controls.mean()), 4),
            "held_residual_membership_p": None if held is None else float(f"{held.residual_p():.4g}"),
            "never_seen_samples": len(self.never_seen),
            "never_seen_member_share": round(float(self.never_seen.lira.above_controls.mean()), 4),
            "never_seen_residual_membership_p": float(f"{self.never_seen.residual_p():.4g}"),
            "held_auc_lira": None if held is None else held.lira.summary()["auc"],
            "held_auc_rmia": None if held is None else held.rmia.summary()["auc"],
        }
