"""The second, differently built attack: RMIA (Zarifzadeh, Liu, Shokri, ICML 2024), offline, over the same
references and never-seen controls as the LiRA test, with rank (not parametric) p-values.

RMIA scores a sample by its likelihood ratio against a population: LR(x, z) = [Pr(x|f) / Pr(x)] / [Pr(z|f) /
Pr(z)], Pr(.|f) the audited model's probability of the label, Pr(.) its average over reference models (here
the OUT ones: offline), and calls x a member when LR(x, z) > gamma for a large share of population samples z.
That share is a monotone function of x's own ratio r(x) = log Pr(x|f) - log Pr(x), so a per-sample test only
needs r(x)'s rank among never-seen samples' r. What differs from the LiRA test: probabilities averaged over
the references instead of a median logit, no variance model at all, and exact rank p-values instead of a
Student-t, and one request-level test. What is shared: the controls are scored at x's label with x's own OUT
references, and x is ranked among the ``MATCHED_CONTROLS`` whose Pr(.) is nearest its own (a never-seen sample
of the same difficulty; for a mislabelled sample, controls the references also find unlikely at that label).
gamma plays no part once the ratio is ranked among controls: any gamma gives the same ranks.

Per sample: p_member = (1 + #controls with r >= r(x)) / (m + 1), exact for a sample exchangeable with its
controls; p_under the mirror. Per request: the share of samples beyond their controls' upper 5 % tail, and the
share beyond their lower one, by the LiRA test's rank rule (``membership.beyond_tail``; binomial at its exact
null rate). The per-sample ranks are too coarse for a Holm-corrected extreme-sample test
(1 in 51 at best). A mean-rank test was tried and dropped: the samples' ranks share controls (few distinct OUT
masks at small K), its variance is larger than independent ranks', and it turned exact retrains down (over-
forgetting, p = 0.011 on the memorised digits case) and flagged never-seen samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, log_expit

from worker.audit.membership import (
    MATCHED_CONTROLS,
    SHARE_TAIL,
    Query,
    attack_power,
    beyond_tail,
    binomial_tail,
    rows_of,
    tail_rate,
)
from worker.audit.references import ReferenceSet
from worker.audit.scores import stable_logit_all_labels


@dataclass(frozen=True)
class RankTest:
    """RMIA's per-sample evidence on one forget set (arrays aligned with the forget set)."""

    ratio: np.ndarray  # r(x) = log Pr(x|f) - log Pr(x)
    rank: np.ndarray  # share of x's matched controls with a lower ratio (ties half), in [0, 1]
    p_member: np.ndarray
    p_under: np.ndarray
    above_controls: np.ndarray  # bool: beyond the matched controls' upper tail
    below_controls: np.ndarray  # bool: beyond their lower tail
    control_rank: np.ndarray  # ranks of never-seen controls among their own matched set (the negatives)
    tail_rate: float  # the chance a sample exchangeable with its controls is beyond a tail

    def __len__(self) -> int:
        return len(self.rank)

    def subset(self, rows: list[int]) -> RankTest:
        return rows_of(self, rows, shared=("control_rank", "tail_rate"))

    def residual_p(self) -> float:
        return binomial_tail(int(self.above_controls.sum()), len(self), self.tail_rate)

    def over_forgetting_p(self) -> float:
        return binomial_tail(int(self.below_controls.sum()), len(self), self.tail_rate)

    def summary(self) -> dict[str, Any]:
        n = len(self)
        above, below = int(self.above_controls.sum()), int(self.below_controls.sum())
        return {
            "samples": n,
            "member_share": round(above / n, 4) if n else None,
            "over_forgetting_share": round(below / n, 4) if n else None,
            "mean_rank": round(float(self.rank.mean()), 4) if n else None,
            "residual_membership_p": float(f"{self.residual_p():.4g}"),
            "over_forgetting_p": float(f"{self.over_forgetting_p():.4g}"),
            **attack_power(self.rank, self.control_rank),
        }


def _log_prior(reference_scores: np.ndarray) -> np.ndarray:
    """log Pr(.): the log of the mean probability over references (axis 0) from their stable logits."""
    return np.log(np.mean(expit(reference_scores), axis=0))


def rmia_test(
    refs: ReferenceSet,
    forget_rows: np.ndarray,
    model_forget_scores: np.ndarray,
    model_audit_logits: np.ndarray,
    *,
    matched_controls: int = MATCHED_CONTROLS,
    query: Query | None = None,
) -> RankTest:
    """RMIA on dataset ``forget_rows`` under one model (its phi there and its logits on ``refs.audit_rows``);
    ``query``: other samples than train rows, as in ``membership_test``."""
    if query is None:
        query = Query.of_train_rows(refs, forget_rows)
    exclude = query.exclude_controls if len(query.exclude_controls) else None
    model_audit = stable_logit_all_labels(model_audit_logits)  # (N_a, C)
    reference_audit = refs.audit_scores  # (K, N_a, C)
    n = len(query.labels)
    ratio, rank = np.empty(n), np.empty(n)
    p_member, p_under = np.empty(n), np.empty(n)
    above, below = np.zeros(n, bool), np.zeros(n, bool)
    rate = SHARE_TAIL if n == 0 else 0.0
    negatives: list[np.ndarray] = []
    cache: dict[tuple[bytes, int], tuple[np.ndarray, np.ndarray]] = {}
    for i in range(n):
        out, label = query.out[:, i], int(query.labels[i])
        key = (out.tobytes(), label)
        if key not in cache:  # K/2 of K references: few distinct masks, so the controls' ratios repeat
            prior = _log_prior(reference_audit[out, :, label])
            cache[key] = (prior, log_expit(model_audit[:, label]) - prior)
        control_prior, control_ratio = cache[key]
        prior = _log_prior(query.reference_scores[out, i][:, None])[0]
        ratio[i] = float(log_expit(model_forget_scores[i])) - prior
        candidates = np.abs(control_prior - prior)
        if exclude is not None:
            candidates[exclude[i]] = np.inf
        size = min(matched_controls, len(candidates) - (exclude is not None))
        nearest = np.argpartition(candidates, size - 1)[:size]
        yardstick = control_ratio[nearest]
        lower, ties = (yardstick < ratio[i]).sum(), (yardstick == ratio[i]).sum()
        rank[i] = (lower + 0.5 * ties) / size
        p_member[i] = (1 + size - lower) / (size + 1)
        p_under[i] = (1 + lower + ties) / (size + 1)
        above[i], below[i] = beyond_tail(ratio[i], yardstick)
        rate = max(rate, tail_rate(size))
        if len(negatives) < 64:  # a sample of the controls' own ranks, the attack's negatives for its AUC
            order = yardstick.argsort().argsort()
            negatives.append((order + 0.5) / size)
    return RankTest(
        ratio=ratio, rank=rank, p_member=p_member, p_under=p_under, above_controls=above,
        below_controls=below, tail_rate=rate,
        control_rank=np.concatenate(negatives) if negatives else np.empty(0),
    )  # fmt: skip
