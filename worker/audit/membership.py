"""The per-sample membership test: does the audited model still treat a forgotten sample as a member?

LiRA-offline (Carlini et al. 2022) calibrated on never-seen controls under the same model:

1. For forgotten sample x, its OUT references (the K/2 that never trained on it) give the score a model
   that never saw x would have: z(x) = (phi_model(x) - median_OUT phi(x)) / s(x), s a per-sample spread
   shrunk towards the pooled one (K/2 scores alone make an unstable spread).
2. The same z for never-seen controls c (the audit split, trained on by no model), scored at x's label,
   with x's own OUT references, under the same audited model. The audited model saw all train data, the
   references half of it: it is more confident than they are on never-seen data, and the shift depends on
   how typical the sample is (for a sample whose label the references do not predict, a mislabelled or
   atypical one, a stronger model scores it lower, not higher). So x is read against the
   ``MATCHED_CONTROLS`` controls whose OUT-reference median is nearest its own (the same difficulty; at
   x's label, controls of other classes stand in for atypical samples): z(x) centred and scaled by theirs
   (robust median / MAD). The result t(x) has a never-seen sample's distribution under H0.
3. Per sample: p_member = P(T >= t), p_under = P(T <= t) under a Student-t with ``STUDENT_T_DOF`` degrees
   of freedom (heavier tails than a Gaussian: never-seen data has hard samples, and a Gaussian tail would
   call them members once corrected for many samples). Per request: the share of samples beyond their
   matched controls' upper 5 % tail (and their lower one: over-forgetting, which is itself a tell), each
   with a one-sided binomial p-value; the attack's AUC and TPR at 1 % / 0.1 % FPR against the controls.

"Beyond the tail" is a rank among the sample's own matched controls, not t > 1.645 (:func:`beyond_tail`): a
sample exchangeable with its controls lands there with a known probability (2 in 51 among 50 controls),
whatever their distribution. The Gaussian threshold on a statistic standardised by 50 controls' median and
MAD was not: the estimated location and scale, and tails heavier than a Gaussian's, put 6-8 % of never-seen
samples beyond it where the binomial assumed 5 % (measured on the calibration runs' never-seen and exactly
retrained samples, and in simulation), so the share test turned exact retrains down several times its level.

A request-level test combines the share test and the most extreme sample (Holm-corrected over the samples)
with a Bonferroni factor of 2, so its level is the configured one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from worker.audit.references import ReferenceSet
from worker.audit.scores import stable_logit_all_labels

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

STUDENT_T_DOF = 4
SHARE_TAIL = 0.05  # the share tests count samples beyond their matched controls' 5 % tails
SPREAD_PRIOR = 4.0  # pseudo-observations of the pooled variance in each sample's spread
# Controls nearest in difficulty that calibrate each sample: fewer than a class holds in the audit split, so a
# typical sample is read against typical controls of its class, not against confusable ones of other classes.
MATCHED_CONTROLS = 50
MAX_AUC_NEGATIVE_ROWS = 256  # forgotten samples whose control sets feed the AUC (a sample of them)
Calibration = Literal["difficulty", "class", "none"]


@dataclass(frozen=True)
class Query:
    """Samples to test that are not train rows (the never-seen negative control): each one's OUT mask (K, n),
    label (n,), reference phi at that label (K, n), and its own position among the controls, left out of
    its yardstick (n,)."""

    out: np.ndarray
    labels: np.ndarray
    reference_scores: np.ndarray
    exclude_controls: np.ndarray

    @classmethod
    def of_train_rows(cls, refs: ReferenceSet, rows: np.ndarray) -> Query:
        columns = refs.train_columns(rows)
        return cls(
            out=~refs.members[:, columns], labels=refs.train_labels[columns],
            reference_scores=refs.train_scores[:, columns], exclude_controls=np.empty(0, dtype=np.int64),
        )  # fmt: skip


@dataclass(frozen=True)
class MembershipTest:
    """One audited model's per-sample evidence on one forget set (arrays aligned with the forget set)."""

    offset: np.ndarray  # phi_model - median phi of the OUT references, in logit units
    t: np.ndarray  # the calibrated statistic (a never-seen sample's distribution under H0)
    p_member: np.ndarray  # one-sided: still looks like a member
    p_under: np.ndarray  # one-sided: looks less like a member than never-seen data
    above_controls: np.ndarray  # bool: beyond the matched controls' upper tail (:func:`beyond_tail`)
    below_controls: np.ndarray  # bool: beyond their lower tail
    control_t: np.ndarray  # t of never-seen controls under the same normalisation (the attack's negatives)
    tail_rate: float  # the chance a sample exchangeable with its controls is beyond a tail (the share's null)

    def __len__(self) -> int:
        return len(self.t)

    def subset(self, rows: list[int]) -> MembershipTest:
        """The same evidence for some of the samples (a data subject's), tested on its own."""
        return rows_of(self, rows, shared=("control_t", "tail_rate"))

    @property
    def p_member_adjusted(self) -> np.ndarray:
        return holm(self.p_member)

    @property
    def p_under_adjusted(self) -> np.ndarray:
        return holm(self.p_under)

    def residual_p(self) -> float:
        """p-value of "some of these samples are still members": share test and most extreme sample."""
        above = binomial_tail(int(self.above_controls.sum()), len(self), self.tail_rate)
        return _combined(above, self.p_member_adjusted)

    def over_forgetting_p(self) -> float:
        """p-value of "these samples look less like members than never-seen data" (the mirror test)."""
        below = binomial_tail(int(self.below_controls.sum()), len(self), self.tail_rate)
        return _combined(below, self.p_under_adjusted)

    def summary(self) -> dict[str, Any]:
        n = len(self)
        above, below = int(self.above_controls.sum()), int(self.below_controls.sum())
        return {
            "samples": n,
            "member_share": round(above / n, 4),
            "member_share_expected": round(self.tail_rate, 4),
            "member_share_p": _p(binomial_tail(above, n, self.tail_rate)),
            "over_forgetting_share": round(below / n, 4),
            "over_forgetting_share_p": _p(binomial_tail(below, n, self.tail_rate)),
            "min_sample_p_member_holm": _p(float(self.p_member_adjusted.min())),
            "min_sample_p_under_holm": _p(float(self.p_under_adjusted.min())),
            "residual_membership_p": _p(self.residual_p()),
            "over_forgetting_p": _p(self.over_forgetting_p()),
            "median_offset": round(float(np.median(self.offset)), 4),
            "median_t": round(float(np.median(self.t)), 4),
            **attack_power(self.t, self.control_t),
            "roc": roc_points(self.t, self.control_t),
        }


TestT = TypeVar("TestT", bound="DataclassInstance")


def rows_of(test: TestT, rows: list[int], shared: tuple[str, ...]) -> TestT:
    """A per-sample test (a dataclass of arrays aligned with its samples) for some of its samples; the
    ``shared`` fields (the controls' scores, the null rate) are kept whole."""
    index = np.asarray(rows, dtype=np.int64)
    fields = {
        f.name: getattr(test, f.name) if f.name in shared else getattr(test, f.name)[index]
        for f in dataclasses.fields(test)
    }
    return dataclasses.replace(test, **fields)


def _p(value: float) -> float:
    return float(f"{value:.4g}")


def _combined(share_p: float, adjusted: np.ndarray) -> float:
    return min(1.0, 2.0 * min(share_p, float(adjusted.min())))


def binomial_tail(successes: int, n: int, rate: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, rate)."""
    return float(stats.binom.sf(successes - 1, n, rate))


def tail_rate(controls: int, tail: float = SHARE_TAIL) -> float:
    """The probability that a sample exchangeable with its ``controls`` matched controls is beyond their
    ``tail`` by :func:`beyond_tail` (exactly, for continuous scores; at most, with ties)."""
    return float(np.floor(tail * (controls + 1))) / (controls + 1)


def beyond_tail(value: float, yardstick: np.ndarray, tail: float = SHARE_TAIL) -> tuple[bool, bool]:
    """Whether ``value`` is beyond the upper and the lower ``tail`` of ``yardstick`` (its matched controls),
    by rank: its conformal p-value, (1 + controls at or beyond it) / (controls + 1), is at most ``tail``.
    Distribution-free: no location, scale or tail shape is assumed of the controls."""
    allowed = np.floor(tail * (len(yardstick) + 1)) - 1  # controls that may lie at or beyond it
    return bool((yardstick >= value).sum() <= allowed), bool((yardstick <= value).sum() <= allowed)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error over the samples)."""
    n = len(p)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((n - np.arange(n)) * p[order]))
    out = np.empty(n)
    out[order] = adjusted
    return out


def attack_power(positive_t: np.ndarray, control_t: np.ndarray) -> dict[str, float | None]:
    """The per-sample attack's AUC and TPR at 1 % and 0.1 % FPR: forgotten samples vs never-seen controls."""
    if len(positive_t) == 0 or len(control_t) == 0:
        return {"auc": None, "tpr_at_1pct_fpr": None, "tpr_at_0_1pct_fpr": None}
    labels = np.r_[np.ones(len(positive_t)), np.zeros(len(control_t))]
    auc = float(roc_auc_score(labels, np.r_[positive_t, control_t]))
    return {
        "auc": round(auc, 4),
        "tpr_at_1pct_fpr": round(float((positive_t > np.quantile(control_t, 0.99)).mean()), 4),
        "tpr_at_0_1pct_fpr": round(float((positive_t > np.quantile(control_t, 0.999)).mean()), 4),
    }


ROC_FPRS = np.logspace(-3, 0, 31)


def roc_points(positive_t: np.ndarray, control_t: np.ndarray) -> dict[str, list[float]] | None:
    """The attack's ROC on a log grid of false-positive rates (for a log-log plot)."""
    if len(positive_t) == 0 or len(control_t) == 0:
        return None
    thresholds = np.quantile(control_t, 1 - ROC_FPRS)
    tpr = [(positive_t > threshold).mean() for threshold in thresholds]
    return {"fpr": [round(float(f), 5) for f in ROC_FPRS], "tpr": [round(float(v), 4) for v in tpr]}


def _spread(scores: np.ndarray, pooled_variance: float, prior: float = SPREAD_PRIOR) -> np.ndarray:
    """Per-column spread of ``scores`` (refs x samples), shrunk towards the pooled variance by ``prior``
    pseudo-observations (``inf``: the pooled spread alone)."""
    m = scores.shape[0] - 1
    if m <= 0 or np.isinf(prior):
        return np.full(scores.shape[1], np.sqrt(pooled_variance))
    variance = scores.var(axis=0, ddof=1)
    return np.sqrt((m * variance + prior * pooled_variance) / (m + prior))


def membership_test(
    refs: ReferenceSet,
    forget_rows: np.ndarray,
    model_forget_scores: np.ndarray,
    model_audit_logits: np.ndarray,
    *,
    matched_controls: int = MATCHED_CONTROLS,
    calibration: Calibration = "difficulty",
    seed: int = 0,
    spread_prior: float = SPREAD_PRIOR,
    query: Query | None = None,
) -> MembershipTest:
    """Test each forgotten sample (dataset ``forget_rows``) under one audited model, given its phi on the
    forget rows and its logits on ``refs.audit_rows`` (same order).

    ``calibration`` is what z(x) is read against: ``difficulty`` (the audit's: matched controls, above),
    ``class`` (the never-seen controls of x's class at their own label) or ``none`` (z as it is: LiRA-offline
    without controls). The last two exist for the calibration benchmark's comparison. ``spread_prior``: the
    pooled variance's weight in pseudo-observations (``inf``: one fixed spread for every sample).

    ``query``: other samples than the train rows ``forget_rows`` (which then only name them)."""
    if query is None:
        query = Query.of_train_rows(refs, forget_rows)
    exclude = query.exclude_controls if len(query.exclude_controls) else None
    reference_audit = refs.audit_scores  # (K, N_a, C)
    model_audit = stable_logit_all_labels(model_audit_logits)  # (N_a, C)
    pooled = refs.pooled_variance
    n = len(query.labels)
    offset, t = np.empty(n), np.empty(n)
    above, below = np.zeros(n, bool), np.zeros(n, bool)
    rate = 0.0
    negatives: list[np.ndarray] = []
    negative_rows = set(np.random.default_rng(seed).permutation(n)[:MAX_AUC_NEGATIVE_ROWS].tolist())
    for i in range(n):
        out, label = query.out[:, i], int(query.labels[i])
        if not out.any():
            raise ValueError(f"row {int(forget_rows[i])} has no reference that never trained on it")
        own = query.reference_scores[out, i]
        difficulty = np.median(own)  # what a model that never saw x scores it at: how typical x is
        offset[i] = model_forget_scores[i] - difficulty
        z = offset[i] / _spread(own[:, None], pooled, spread_prior)[0]
        # Every control scored at x's label by x's own OUT references and by the audited model; the ones
        # those references find as hard as x are its yardstick.
        controls = reference_audit[out, :, label]  # (K/2, N_a)
        control_difficulty = np.median(controls, axis=0)
        control_z = (model_audit[:, label] - control_difficulty) / _spread(controls, pooled, spread_prior)
        distance = np.abs(control_difficulty - difficulty)
        if exclude is not None:
            distance[exclude[i]] = np.inf
        if calibration == "difficulty":
            size = min(matched_controls, len(control_z) - (exclude is not None))
            nearest = np.argpartition(distance, size - 1)[:size]
        elif calibration == "class":
            nearest = np.flatnonzero((refs.audit_labels == label) & np.isfinite(distance))
        else:
            nearest = np.empty(0, dtype=np.int64)
        location, scale = _robust(control_z[nearest]) if len(nearest) else (0.0, 1.0)
        t[i] = (z - location) / scale
        if len(nearest):
            above[i], below[i] = beyond_tail(z, control_z[nearest])
            rate = max(rate, tail_rate(len(nearest)))
        else:  # z alone (no controls): read as a standard normal
            above[i], below[i] = t[i] > stats.norm.isf(SHARE_TAIL), t[i] < stats.norm.ppf(SHARE_TAIL)
            rate = SHARE_TAIL
        if i in negative_rows and len(nearest):
            control_t = (control_z[nearest] - location) / scale
            negatives.append(control_t)
    return MembershipTest(
        offset=offset,
        t=t,
        p_member=stats.t.sf(t, STUDENT_T_DOF),
        p_under=stats.t.cdf(t, STUDENT_T_DOF),
        above_controls=above,
        below_controls=below,
        control_t=np.concatenate(negatives) if negatives else np.empty(0),
        tail_rate=rate or SHARE_TAIL,
    )


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based standard deviation (never zero)."""
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    return median, max(mad, 1e-6)
