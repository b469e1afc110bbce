"""One audit: a base model and its unlearned successor, the forgotten samples, the reference set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.audit.evidence import (
    PowerCheck,
    both_attacks,
    detectable_share,
    matched_held_rows,
    never_seen_evidence,
)
from worker.audit.gate import (
    FAILING_VERDICTS,
    AuditRules,
    gate,
    pooled_verdict,
    sample_outcomes,
    subject_verdicts,
    verdict,
)
from worker.audit.membership import Calibration, MembershipTest, membership_test
from worker.audit.references import ReferenceSet
from worker.audit.scores import stable_logit
from worker.audit.utility import utility_comparison
from worker.engine.context import RunContext
from worker.engine.runtime import Runtime
from worker.evaluation.metrics import Scorable, ScoredModel, model_logits

METHOD = (
    "two per-sample membership attacks over the same references and never-seen controls, the verdict the "
    "worse of the two: LiRA-offline (the K/2 reference models that never trained on a sample; score: stable "
    "logit of the labelled class) and RMIA-offline (likelihood ratio of the label's probability against its "
    "mean over those references, ranked), each calibrated against the never-seen controls of the same "
    "difficulty scored at the sample's label under the same model; a power check on every version (the same "
    "test on samples the version still holds, matched in difficulty, and on never-seen samples)"
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


def score_model(
    model: Scorable,
    refs: ReferenceSet,
    x: torch.Tensor,
    rows: np.ndarray,
    audit_x: torch.Tensor,
    audit_rows: np.ndarray,
    runtime: Runtime,
) -> tuple[np.ndarray, torch.Tensor]:
    """``model``'s phi on train ``rows`` (``x``, at their labels) and its logits on the audit split in
    ``refs.audit_rows`` order."""
    ctx = RunContext(runtime=runtime)
    labels = torch.from_numpy(refs.train_labels[refs.train_columns(rows)])
    scores = stable_logit(model_logits(model, x, ctx), labels).numpy()
    return scores, order_by_rows(model_logits(model, audit_x, ctx), audit_rows, refs.audit_rows)


def power_check(
    model: Scorable,
    refs: ReferenceSet,
    forget_rows: np.ndarray,
    held: tuple[torch.Tensor, np.ndarray] | None,
    audit_logits: np.ndarray,
    rules: AuditRules,
    runtime: Runtime,
    seed: int,
) -> PowerCheck:
    """The test under ``model`` on held samples (``held``: x and rows of samples it still holds) matched to
    the forgotten ones in difficulty (``HELD_PER_SAMPLE`` each), and on as many never-seen samples as there
    are forgotten ones."""
    never_seen = never_seen_evidence(refs, audit_logits, len(forget_rows), seed)
    if held is None:
        return PowerCheck(None, never_seen, rules.direction_level)
    held_x, held_rows = held
    matched = matched_held_rows(refs, forget_rows, held_rows)
    if len(matched) == 0:
        return PowerCheck(None, never_seen, rules.direction_level)
    position = {int(r): i for i, r in enumerate(held_rows)}
    x = held_x[torch.tensor([position[int(r)] for r in matched], dtype=torch.long)]
    labels = torch.from_numpy(refs.train_labels[refs.train_columns(matched)])
    scores = stable_logit(model_logits(model, x, RunContext(runtime=runtime)), labels).numpy()
    return PowerCheck(
        both_attacks(refs, matched, scores, audit_logits, seed=seed), never_seen, rules.direction_level
    )


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
    held: tuple[torch.Tensor, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The per-sample membership audit of ``base`` and ``unlearned`` on the forgotten samples (two attacks),
    the power check on ``unlearned``, the utility comparison on the audit split, the gate and the verdict,
    as JSON-ready data (rule first).

    ``remaining``: some samples still trained on (x, labels), for the score distributions a reader compares
    the forgotten samples' with. ``held``: samples the unlearned model still holds (x, dataset rows), the
    pool the power check draws its difficulty-matched positives from."""
    started = time.monotonic()
    scored: dict[str, tuple[np.ndarray, torch.Tensor]] = {
        name: score_model(model, refs, forget_x, forget_rows, audit_x, audit_rows, runtime)
        for name, model in (("before", base), ("after", unlearned))
    }
    before, after = (
        both_attacks(refs, forget_rows, scores, logits.numpy(), seed=seed)
        for scores, logits in scored.values()
    )
    utility = utility_comparison(
        refs.audit_labels,
        scored["before"][1].argmax(1).numpy(),
        scored["after"][1].argmax(1).numpy(),
        rules.max_class_drop,
        rules.max_audit_drop,
    )
    power = power_check(unlearned, refs, forget_rows, held, scored["after"][1].numpy(), rules, runtime, seed)
    unchanged = _identical(base, unlearned)
    controls = len(refs.audit_rows)
    outcome = verdict(before, after, rules, unchanged=unchanged, controls=controls, power=power)
    decision = gate(before, after, utility, rules, unchanged=unchanged, controls=controls, power=power)
    subjects = list(forget_subjects)
    after_outcomes = sample_outcomes(after, rules.direction_level)
    return {
        "rule": rules.to_dict(),
        "method": METHOD,
        "limitations": LIMITATIONS,
        "references": refs.describe(),
        "verdict": outcome,
        "evidence": {
            "scope": "request",
            "samples": len(forget_rows),
            "detectable_member_share": detectable_share(len(forget_rows), rules.direction_level),
        },
        "gate": decision,
        "membership": {"before": before.summary(), "after": after.summary()},
        "power": power.summary(),
        "subjects": subject_verdicts(subjects, before, after, rules, outcome),
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
                "t_before": round(float(before.lira.t[i]), 3),
                "t_after": round(float(after.lira.t[i]), 3),
                "p_member_before": float(f"{before.lira.p_member[i]:.4g}"),
                "p_member_after": float(f"{after.lira.p_member[i]:.4g}"),
                "p_under_after": float(f"{after.lira.p_under[i]:.4g}"),
                "rmia_rank_after": round(float(after.rmia.rank[i]), 3),
            }
            for i, sample_id in enumerate(forget_sample_ids)
        ],
        "seconds": round(time.monotonic() - started, 3),
    }


def with_batch_evidence(audit: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    """A request's audit, read with its job's pooled audit (every request's samples together): where the
    request's own samples cannot speak, the batch's verdict covers it (``gate.pooled_verdict``)."""
    combined, scope = pooled_verdict(audit["verdict"], batch["verdict"])
    if scope == "request":
        return {**audit, "evidence": {**audit["evidence"], "batch": _batch_block(batch)}}
    failures = list(audit["gate"]["failures"])
    if combined in FAILING_VERDICTS:
        failures.append(
            f"the request's {audit['evidence']['samples']} samples show no signal of their own; the job's "
            f"pooled audit of {batch['evidence']['samples']} samples, theirs included, is {combined}: "
            + "; ".join(batch["gate"]["failures"])
        )
    return {
        **audit,
        "verdict": combined,
        "evidence": {**audit["evidence"], "scope": "batch", "batch": _batch_block(batch)},
        "gate": {**audit["gate"], "passed": not failures, "failures": failures},
    }


def _batch_block(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "verdict": batch["verdict"],
        "samples": batch["evidence"]["samples"],
        "detectable_member_share": batch["evidence"]["detectable_member_share"],
        "membership": batch["membership"],
        "power": batch["power"],
    }
