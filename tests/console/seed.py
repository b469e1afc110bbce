"""Settled deletion requests without an unlearning run: a job is claimed and finished through the
worker-facing service functions (what the worker's pipeline calls), with audit metrics shaped like a real
audit's, so the request, its report, its evidence figures and its trail are the ones a real job leaves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.erasures import service as erasures_service
from service.jobs import service as jobs_service
from service.jobs.service import ClaimedJob
from service.models import service as models_service
from service.storage import StoredObject

WORKER = "test-worker"
LEASE = timedelta(minutes=10)
PASSING = {"forgotten", "no_measurable_signal", "insufficient_power"}


def audit(verdict: str, sample_ids: tuple[str, ...]) -> dict[str, Any]:
    """An audit of one request, with every member the report, the PDF and the console read."""
    passed = verdict in PASSING
    after_share = 0.06 if passed else 0.62

    def side(share: float, auc: float, tpr: float) -> dict[str, Any]:
        return {
            "member_share": share, "member_share_p": 0.4 if share < 0.1 else 1e-4,
            "over_forgetting_share": 0.04, "over_forgetting_share_p": 0.6, "residual_membership_p": 1e-4,
            "auc": auc, "tpr_at_1pct_fpr": tpr,
            "roc": {"fpr": [0.0, 0.01, 0.1, 0.5, 1.0], "tpr": [0.0, tpr, min(0.9, 3 * tpr), 0.95, 1.0]},
        }  # fmt: skip

    edges = [-4.0 + i for i in range(9)]
    return {
        "rule": {"level": 0.05},
        "method": "LiRA-offline per-sample test",
        "limitations": "An audit bounds what this attack can see; it is no proof that nothing remains.",
        "references": {"count": 8},
        "verdict": verdict,
        "gate": {"passed": passed, "failures": [] if passed else ["residual membership (p = 0.0001)"]},
        "membership": {
            "before": side(0.71, 0.93, 0.24),
            "after": side(after_share, *((0.52, 0.012) if passed else (0.88, 0.15))),
        },
        "subjects": {"alice": {"verdict": verdict}} if "s0" in sample_ids else {},
        "utility": {
            "per_class": {
                "0": {"before": 98.0, "after": 97.5},
                "1": {"before": 96.0, "after": 95.0},
                "2": {"before": 94.0, "after": 94.5},
            }
        },
        "score_distributions": {
            "edges": edges,
            "before": {
                "forgotten": [0, 0, 0, 1, 1, 2, 3, 2],
                "remaining": [0, 0, 1, 2, 3, 3, 2, 1],
                "never_seen": [1, 2, 3, 3, 2, 1, 0, 0],
            },
            "after": {
                "forgotten": [1, 2, 3, 2, 1, 1, 0, 0],
                "remaining": [0, 0, 1, 2, 3, 3, 2, 1],
                "never_seen": [1, 2, 3, 3, 2, 1, 0, 0],
            },
        },
        "samples": [{"sample_id": s, "subject_id": None, "p_member": 0.5} for s in sample_ids],
    }


def claim(factory: sessionmaker[Session], job_id: str) -> ClaimedJob:
    with factory.begin() as session:
        claimed = jobs_service.claim_job(session, job_id, WORKER, LEASE)
    assert isinstance(claimed, ClaimedJob), claimed
    return claimed


def reject(factory: sessionmaker[Session], job_id: str) -> None:
    """Claim ``job_id`` and end it as the pipeline ends a job whose audit failed: a rejected version, each
    request rejected with its evidence (a rejected request settles at once; a completed one waits for its
    purge, which is the worker's byte work)."""
    claimed = claim(factory, job_id)
    audits = {t.request_id: audit("residual_membership", t.sample_ids) for t in claimed.targets}
    metrics = {
        "rule": {"level": 0.05},
        "audits": audits,
        "before": {"accuracy": 0.96},
        "after": {"accuracy": 0.95},
    }
    base = claimed.base_version
    with factory.begin() as session:
        jobs_service.set_state(session, claimed.job_id, "evaluating", worker_id=WORKER)
    with factory.begin() as session:
        version = models_service.register_version(
            session, model_id=claimed.model_id, parent_version_id=base.id,
            stored=StoredObject(base.sha256, 0, base.storage_uri),
            method=claimed.method, config=claimed.config,
            metrics_before=metrics["before"], metrics_after=metrics["after"], activate=False,
            rejection_reason="residual membership", job_id=claimed.job_id,
            request_ids=[t.request_id for t in claimed.targets], actor=WORKER,
        )  # fmt: skip
        jobs_service.record_metrics(session, claimed.job_id, metrics, WORKER)
        rows = {row.id: row for row in erasures_service.targets_of_job(session, claimed.job_id)}
        for target in claimed.targets:
            attempt = {"job_id": claimed.job_id, "method": claimed.method, "verdict": "residual_membership",
                       "passed": False, "version_id": version.id}  # fmt: skip
            erasures_service.settle(session, rows[target.target_id], "rejected", WORKER, attempt=attempt)
        jobs_service.finish(
            session, claimed.job_id, "rejected", metrics=metrics, result_version_id=version.id,
            error_reason="audit_gate", error_detail="residual membership", worker_id=WORKER,
        )  # fmt: skip


def report_progress(factory: sessionmaker[Session], job_id: str, step: int, total: int) -> None:
    with factory.begin() as session:
        jobs_service.record_progress(
            session, job_id, {"phase": "unlearning", "step": step, "total_steps": total}, WORKER, LEASE
        )
