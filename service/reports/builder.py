"""The content of an erasure report, from the settled request's rows. Torch-free; personal identifiers (sample
and subject ids) appear only as salted commitments."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from sqlalchemy.orm import Session

from service.core import canonical
from service.datasets import repository as datasets_repository
from service.deletion_requests import repository as requests_repository
from service.deletion_requests.tables import DeletionRequest
from service.erasures import repository as erasures_repository
from service.erasures.tables import ALREADY_ERASED, ErasureTarget
from service.jobs import repository as jobs_repository
from service.models import repository as models_repository
from service.models.tables import ModelVersion
from service.purges import service as purges
from service.reports import commitment

FORMAT = "lethe-erasure-report/2"
EXACT_METHODS = frozenset({"retrain"})
NOT_AUDITED = (
    "No audit ran for this request (it did not reach one): nothing here is evidence that the samples were "
    "erased from the model."
)


@dataclass(frozen=True)
class Rows:
    """What the reports of some settled requests read beyond the requests, in a few queries whatever their
    number: each request's sample ids and targets, and how many requests each of their jobs held."""

    sample_ids: dict[str, list[str]]
    targets: dict[str, list[ErasureTarget]]
    requests_in_job: dict[str, int]

    @classmethod
    def load(cls, session: Session, request_ids: Sequence[str]) -> Rows:
        targets = erasures_repository.targets_of_requests(session, request_ids)
        job_ids = sorted({t.job_id for found in targets.values() for t in found if t.job_id is not None})
        return cls(
            requests_repository.all_sample_ids_of(session, request_ids),
            targets,
            erasures_repository.count_targets_of_jobs(session, job_ids) if job_ids else {},
        )


NOT_INSTALLED = "unknown (run from a source tree that was never installed)"


@functools.cache
def code_version() -> str:
    """The installed distribution's version (read from its files once per process). A worker run from a
    source tree on PYTHONPATH has none: the report says so rather than fail the settlement or guess."""
    try:
        return metadata.version("lethe")
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def canonical_bytes(content: dict[str, Any]) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme): the same content always gives the same bytes to sign."""
    return canonical.dumps(content)


def _pseudonym(salt: bytes, kind: str, value: str) -> str:
    return commitment.leaf(salt, f"{kind}:{value}").hex()


def _version(version: ModelVersion | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {
        "id": version.id,
        "number": version.number,
        "status": version.status,
        "checkpoint_sha256": version.checkpoint_sha256,
        "checkpoint_size": version.checkpoint_size,
    }


def _registry_digest(session: Session, dataset_id: str) -> str:
    """SHA-256 of the dataset's registry (sample id, row, label, split of every sample, by row). Computed once
    per session and dataset: a registry never changes, and a canceled batch's reports all name it."""
    known: dict[str, str] = session.info.setdefault("lethe.registry_digests", {})
    if dataset_id in known:
        return known[dataset_id]
    digest = hashlib.sha256()
    for split in ("train", "audit"):
        for row in datasets_repository.split_rows(session, dataset_id, split):
            digest.update(f"{row.sample_id}\t{row.row}\t{row.label}\t{split}\n".encode())
    known[dataset_id] = digest.hexdigest()
    return known[dataset_id]


def _evidence(audit: dict[str, Any], salt: bytes) -> dict[str, Any]:
    """The audit with sample and subject ids replaced by their salted commitments (jobs since the purge work
    store their audits committed already: see ``commit_audit``)."""
    if audit.get("committed"):
        samples, subjects = audit["samples"], audit["subjects"]
    else:
        committed = commit_audit(audit, salt)
        samples, subjects = committed["samples"], committed["subjects"]
    return {
        "method": audit["method"],
        "references": audit["references"],
        "membership": audit["membership"],
        "evidence": audit.get("evidence"),
        "power": audit.get("power"),
        "subjects": subjects,
        "samples": samples,
        "utility": audit["utility"],
        "score_distributions": audit.get("score_distributions"),
    }


def _erasure(
    session: Session, request: DeletionRequest, target: ErasureTarget, salt: bytes, rows: Rows
) -> dict[str, Any]:
    """What one model did with the request: provenance, the outcome and the audit's evidence."""
    model = models_repository.get_model(session, target.model_id)
    assert model is not None  # a foreign key
    job = jobs_repository.get(session, target.job_id) if target.job_id else None
    metrics = (job.metrics or {}) if job is not None else {}
    audit = (metrics.get("audits") or {}).get(request.id)
    base = (
        models_repository.get_version(session, job.base_version_id) if job and job.base_version_id else None
    )
    result = (
        models_repository.get_version(session, target.result_version_id) if target.result_version_id else None
    )
    job_provenance = None
    if job is not None:
        job_provenance = {
            "id": job.id,
            "worker": job.worker_id,
            "requests_in_job": rows.requests_in_job[job.id],
            "created_at": job.created_at.isoformat(),
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "timings": metrics.get("timings"),
            "environment": metrics.get("environment"),
            # Reference models that steered a calibrated method; the audit below read none of them.
            "steering_references": metrics.get("steering_references", 0),
            # Where the method routes by the forget set's shape: the treatment that ran, and why.
            "treatment": metrics.get("treatment"),
        }
    if target.verdict == ALREADY_ERASED:
        outcome: dict[str, Any] = {
            "verdict": ALREADY_ERASED, "passed": True,
            "detail": "the model held none of the samples: an earlier request erased them (its report holds "
                      "the evidence) or the model was never trained on them",
        }  # fmt: skip
    else:
        outcome = {
            "verdict": audit["verdict"] if audit else None,
            "passed": bool(audit and audit["gate"]["passed"] and target.state == "completed"),
            "state": target.state,
            "failures": audit["gate"]["failures"] if audit else [],
            "error": {"reason": job.error_reason, "detail": job.error_detail}
            if job and job.error_reason
            else None,
            "rule": metrics.get("rule"),
            "gate": audit["gate"] if audit else None,
        }
    return {
        "model": {
            "id": model.id,
            "name": model.name,
            "spec": model.spec,
            "training_recipe": model.training_recipe,
        },
        "state": target.state,
        # The method of the job that settled it: a batch's failures are retried with exact retraining.
        "method": job.method if job is not None else None,
        "samples_held": target.pending_count,
        "already_erased": target.already_erased_count,
        "base_version": _version(base),
        "new_version": _version(result),
        "job": job_provenance,
        "attempts": target.attempts,
        "outcome": outcome,
        "utility_population_metrics": {"before": metrics.get("before"), "after": metrics.get("after")},
        "evidence": _evidence(audit, salt) if audit else None,
        "limitations": audit["limitations"] if audit else NOT_AUDITED,
        # The copies deleted once the model erased the samples, and any kept (with why): see service.purges.
        "purge": purges.purge_view(session, target),
    }


def commit_audit(audit: dict[str, Any], salt: bytes) -> dict[str, Any]:
    """An audit whose per-sample evidence names samples and subjects only by salted commitments: what a job's
    metrics keep (the worker commits with a salt it then discards)."""
    samples = [
        {"sample": commitment.leaf(salt, s["sample_id"]).hex(),
         **{k: v for k, v in s.items() if k not in ("sample_id", "subject_id")}}
        for s in audit["samples"]
    ]  # fmt: skip
    subjects = {
        _pseudonym(salt, "subject", subject): outcome for subject, outcome in audit["subjects"].items()
    }
    return {**audit, "samples": samples, "subjects": subjects, "committed": True}


def build_content(session: Session, request: DeletionRequest, salt: bytes, rows: Rows) -> dict[str, Any]:
    """The report's content (its trail segment apart); ``rows``: what :meth:`Rows.load` read for it."""
    dataset = datasets_repository.get_dataset(session, request.dataset_id)
    assert dataset is not None  # a foreign key
    sample_ids = rows.sample_ids[request.id]
    completed = request.completed_at
    return {
        "format": FORMAT,
        "request": {
            "id": request.id,
            "state": request.state,
            "scope": "model" if request.model_id else "dataset",
            "origin_request_id": request.origin_request_id,
            "received_at": request.received_at.isoformat(),
            "due_at": request.due_at.isoformat(),
            "completed_at": completed.isoformat() if completed else None,
            "due_date_met": completed is not None
            and completed <= request.due_at
            and request.state == "completed",
            "reason": request.reason,
            "subject": _pseudonym(salt, "subject", request.subject_id) if request.subject_id else None,
            "requester": "an API client (the service has no client authentication yet)",
        },
        "samples": {
            "count": request.sample_count,
            "commitment": {
                "algorithm": commitment.ALGORITHM,
                "root": commitment.merkle_root(salt, sample_ids),
            },
        },
        "dataset": {
            "id": dataset.id,
            "name": dataset.name,
            "registry_sha256": _registry_digest(session, dataset.id),
        },
        "method": request.method,
        "method_class": "exact (retrained without the samples)"
        if request.method in EXACT_METHODS
        else "approximate (empirically audited)",
        "config": request.config,
        "seed": request.config.get("seed"),
        "code_version": code_version(),
        # One entry per model the request applies to: the request is completed only if each one is.
        "erasures": [_erasure(session, request, target, salt, rows) for target in rows.targets[request.id]],
    }
