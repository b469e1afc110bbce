"""Stage 4, audit: once per request the job holds (a job coalesces many), the per-sample membership test of
the base and the new model on that request's samples, the power check, utility per class, the gate and the
verdict; the population metrics beside them. A job of several requests is also audited on all their samples
pooled: a request too small to speak alone is covered by that batch evidence, and its report says so.
The per-sample evidence is kept in committed form only (as the report does): no sample or subject id
reaches the job's metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from service.reports import commitment
from service.reports.builder import commit_audit
from worker.audit import AuditRules, ReferenceSet, audit_unlearning
from worker.audit.population import label_splits, population_metrics
from worker.audit.run import with_batch_evidence
from worker.evaluation.metrics import ScoredModel
from worker.pipeline.data import JobSets
from worker.pipeline.heartbeat import Heartbeat

if TYPE_CHECKING:
    from worker.pipeline.job import JobRun


def evaluate(
    job: JobRun,
    heartbeat: Heartbeat,
    base: nn.Module,
    model: nn.Module,
    sets: JobSets,
    refs: ReferenceSet,
    rules: AuditRules,
    seed: int,
    unlearn_seconds: float | None,
) -> dict[str, Any]:
    """The job's metrics: the rule, population metrics before and after, each request's audit, timings."""
    started = time.monotonic()
    scored_base, scored_model = ScoredModel(base, job.runtime), ScoredModel(model, job.runtime)
    splits = label_splits(scored_base, sets.forget, sets.remaining_sample, sets.audit, job.runtime)
    before = population_metrics(scored_base, splits, seed, job.runtime)
    after = population_metrics(scored_model, splits, seed, job.runtime)
    remaining = (splits.remaining.x, splits.remaining.require_labels().numpy())
    held = None
    if sets.remaining_sample.index is not None:  # the power check's pool: samples the new model still holds
        held = (sets.remaining_sample.x, sets.remaining_sample.index.numpy())
    position = {sample_id: i for i, sample_id in enumerate(sets.forget_sample_ids)}

    def audit_of(sample_ids: list[str]) -> dict[str, Any]:
        heartbeat.token.raise_if_cancelled()
        rows = torch.tensor([position[sample_id] for sample_id in sample_ids], dtype=torch.long)
        return audit_unlearning(
            scored_base, scored_model, refs,
            forget_x=sets.forget.x[rows], forget_rows=sets.forget_rows[rows.numpy()],
            forget_sample_ids=sample_ids,
            forget_subjects=[sets.forget_subject_ids[i] for i in rows.tolist()],
            audit_x=sets.audit.x, audit_rows=sets.audit_rows,
            rules=rules, runtime=job.runtime, seed=seed, remaining=remaining, held=held,
        )  # fmt: skip

    targets = [target for target in job.claimed.targets if target.sample_ids]
    batch = audit_of([i for target in targets for i in target.sample_ids]) if len(targets) > 1 else None
    audits: dict[str, dict[str, Any]] = {}
    salt = commitment.new_salt()
    for target in targets:
        audit = audit_of(list(target.sample_ids))
        if batch is not None:
            audit = with_batch_evidence(audit, batch)
        # The job's metrics name samples and subjects only by commitments under a salt nobody keeps.
        audits[target.request_id] = commit_audit(audit, salt)
    heartbeat.token.raise_if_cancelled()
    passed = sorted(request_id for request_id, audit in audits.items() if audit["gate"]["passed"])
    return {
        "rule": rules.to_dict(), "before": before, "after": after, "audits": audits,
        "gate": {"passed": bool(passed), "requests": len(audits), "requests_passed": len(passed)},
        "timings": {
            "unlearn_seconds": unlearn_seconds,
            "audit_seconds": round(
                sum(audit["seconds"] for audit in audits.values()) + (batch["seconds"] if batch else 0.0), 3
            ),
            "evaluation_seconds": round(time.monotonic() - started, 3),  # population metrics + audits
        },
        "environment": job.runtime.describe(),
    }  # fmt: skip
