"""One audit: a base model and its unlearned successor, the forgotten samples, the reference set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.audit.gate import AuditRules, gate, sample_outcomes, subject_verdicts, verdict
from worker.audit.membership import Calibration, MembershipTest, membership_test
from worker.audit.references import ReferenceSet
from worker.audit.scores import stable_logit
from worker.audit.utility import utility_comparison
from worker.engine.context import RunContext
from worker.engine.runtime import Runtime
from worker.evaluation.metrics import Scorable, ScoredModel, model_logits

METHOD = (
    "per-sample membership test: LiRA-offline (the K/2 reference models that never trained on a sample) "
    "calibrated against the never-seen controls of the same difficulty, scored at the sample's label under "
    "the same model; score: stable logit of the labelled class"
)
LIMITATIONS = (
    "Empirical, not a proof: the test reads the model's outputs (black-box, confidence-based) and can only "
    "show that the forgotten samples are scored like data the model never saw. Where the model before "
    "unlearning showed no membership signal either, the test cannot tell erasure from doing nothing and "
    "says so. Reference models were trained once on halves of the training data and discarded; only their "
    "scores are kept."
)


def order_by_rows(values: torch.Tensor, rows: np.ndarray, wanted: np.ndarray) -> torch.Tensor:
    """``values`` (aligned with ``rows``) reordered to follow ``wanted`` (a permutation of ``rows``)."""
    position = {int(r): i for i, r in enumerate(rows)}
    return values[torch.tensor([position[int(r)] for r in wanted], dtype=torch.long)]


def test_model(
    model: Scorable,
    refs: ReferenceSet,
    forget_x: torch.Tensor,
    forget_rows: np.ndarray,
    audit_x: torch.Tensor,
    audit_rows: np.ndarray,
    runtime: Runtime,
    seed: int = 0,
    calibration: Calibration = "difficulty",
) -> tuple[MembershipTest, np.ndarray]:
    """One model's membership test on the forget rows, and its predictions on the audit split in
    ``refs.audit_rows`` order."""
    ctx = RunContext(runtime=runtime)
    forget_labels = refs.train_labels[refs.train_columns(forget_rows)]
    forget_scores = stable_logit(model_logits(model, forget_x, ctx), torch.from_numpy(forget_labels))
    audit_logits = order_by_rows(model_logits(model, audit_x, ctx), audit_rows, refs.audit_rows)
    test = membership_test(
        refs, forget_rows, forget_scores.numpy(), audit_logits.numpy(), seed=seed, calibration=calibration
    )
    return test, audit_logits.argmax(1).numpy()


def score_distributions(
    models: dict[str, Scorable],
    refs: ReferenceSet,
    forget_x: torch.Tensor,
    forget_rows: np.ndarray,
    audit_x: torch.Tensor,
    audit_rows: np.ndarray,
    remaining: tuple[torch.Tensor, np.ndarray] | None,
    runtime: Runtime,
    bins: int = 25,
) -> dict[str, Any]:
    """Histograms of phi (the stable logit of the label) for the forgotten, remaining and never-seen samples
    under each model, on shared bin edges (the 1st to 99th percentile of every score)."""
    ctx = RunContext(runtime=runtime)
    forget_labels = torch.from_numpy(refs.train_labels[refs.train_columns(forget_rows)])
    audit_labels = torch.from_numpy(refs.audit_labels)
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name, model in models.items():
        audit_logits = order_by_rows(model_logits(model, audit_x, ctx), audit_rows, refs.audit_rows)
        groups = {
            "forgotten": stable_logit(model_logits(model, forget_x, ctx), forget_labels).numpy(),
            "never_seen": stable_logit(audit_logits, audit_labels).numpy(),
        }
        if remaining is not None:
            x, labels = remaining
            groups["remaining"] = stable_logit(model_logits(model, x, ctx), torch.from_numpy(labels)).numpy()
        scores[name] = groups
    every = np.concatenate([v for groups in scores.values() for v in groups.values()])
    low, high = np.percentile(every, [1, 99])
    edges = np.linspace(low, high, bins + 1)
    return {
        "score": "stable logit of the labelled class",
        "edges": [round(float(e), 4) for e in edges],
        **{
            name: {
                group: np.histogram(np.clip(v, low, high), edges)[0].tolist() for group, v in groups.items()
            }
            for name, groups in scores.items()
        },
    }


def _identical(first: Scorable, second: Scorable) -> bool:
    a, b = _module(first).state_dict(), _module(second).state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _module(model: Scorable) -> nn.Module:
    return model.model if isinstance(model, ScoredModel) else model


def audit_unlearning(
    base: Scorable,
    unlearned: Scorable,
    refs: ReferenceSet,
    *,
    forget_x: torch.Tensor,
    forget_rows: np.ndarray,
    forget_sample_ids: Sequence[str],
    forget_subjects: Sequence[str | None],
    audit_x: torch.Tensor,
    audit_rows: np.ndarray,
    rules: AuditRules,
    runtime: Runtime,
    seed: int = 0,
    remaining: tuple[torch.Tensor, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The per-sample membership audit of ``base`` and ``unlearned`` on the forgotten samples, the utility
    comparison on the audit split, the gate and the verdict, as JSON-ready data (rule first).

    ``remaining``: some samples still trained on (x, labels), for the score distributions a reader compares
    the forgotten samples' with."""
    started = time.monotonic()
    before, before_predictions = test_model(
        base, refs, forget_x, forget_rows, audit_x, audit_rows, runtime, seed
    )
    after, after_predictions = test_model(
        unlearned, refs, forget_x, forget_rows, audit_x, audit_rows, runtime, seed
    )
    utility = utility_comparison(
        refs.audit_labels, before_predictions, after_predictions, rules.max_class_drop
    )
    unchanged = _identical(base, unlearned)
    controls = len(refs.audit_rows)
    outcome = verdict(before, after, rules, unchanged=unchanged, controls=controls)
    decision = gate(before, after, utility, rules, unchanged=unchanged, controls=controls)
    subjects = list(forget_subjects)
    after_outcomes = sample_outcomes(after, rules.level)
    return {
        "rule": rules.to_dict(),
        "method": METHOD,
        "limitations": LIMITATIONS,
        "references": refs.describe(),
        "verdict": outcome,
        "gate": decision,
        "membership": {"before": before.summary(), "after": after.summary()},
        "subjects": subject_verdicts(subjects, before, after, rules),
        "utility": utility,
        "score_distributions": score_distributions(
            {"before": base, "after": unlearned},
            refs,
            forget_x,
            forget_rows,
            audit_x,
            audit_rows,
            remaining,
            runtime,
        ),
        "samples": [
            {
                "sample_id": sample_id,
                "subject_id": subjects[i],
                "outcome": after_outcomes[i],
                "t_before": round(float(before.t[i]), 3),
                "t_after": round(float(after.t[i]), 3),
                "p_member_before": float(f"{before.p_member[i]:.4g}"),
                "p_member_after": float(f"{after.p_member[i]:.4g}"),
                "p_under_after": float(f"{after.p_under[i]:.4g}"),
            }
            for i, sample_id in enumerate(forget_sample_ids)
        ],
        "seconds": round(time.monotonic() - started, 3),
    }
