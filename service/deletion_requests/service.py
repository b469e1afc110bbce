"""Deletion requests: validation and creation (with their job), and settling them when the job ends.

Never commits: the HTTP route commits the request and its job before dispatching; the worker commits settling
together with the job's final state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from service.core.clock import utcnow
from service.core.problems import InvalidInput, NotFound, listed_problem
from service.core.settings import Settings
from service.datasets import repository as datasets_repository
from service.datasets.tables import Dataset, Sample
from service.deletion_requests import repository
from service.deletion_requests.schemas import DeletionRequestCreate
from service.deletion_requests.tables import DeletionRequest
from service.jobs import repository as jobs_repository
from service.jobs.tables import Job
from service.models import repository as models_repository
from service.models.tables import Model
from service.reports.generation import generate as generate_report
from service.trail import service as trail
from worker.engine.config import (
    DEFAULT_LABEL_AGNOSTIC_METHOD,
    DEFAULT_METHOD,
    METHODS,
    ConfigError,
    config_to_dict,
    make_config,
)

# Final request state for each terminal job state.
REQUEST_STATE_FOR_JOB = {
    "succeeded": "completed",
    "rejected": "rejected",
    "failed": "failed",
    "canceled": "canceled",
}


@dataclass(frozen=True)
class CreatedRequest:
    request: DeletionRequest
    model: Model
    job: Job | None  # None when every named sample was already forgotten


def create_request(session: Session, settings: Settings, data: DeletionRequestCreate) -> CreatedRequest:
    """Validate a deletion request completely, then add it, its samples and (if needed) its queued job.

    Nothing is written unless every check passes. Samples an earlier request already erased are recorded as
    ``already_forgotten`` and left out of the job; when that is all of them the request completes at once,
    without a job. The caller commits, then dispatches the job.
    """
    model = models_repository.get_model_by_name(session, data.model)
    if model is None:
        raise InvalidInput("unknown-model", f"no model named {data.model!r}", field="model", model=data.model)
    dataset = datasets_repository.get_dataset(session, model.dataset_id)
    assert dataset is not None  # models.dataset_id is a foreign key
    method, config = _method_and_config(data, dataset)
    samples = _named_samples(session, settings, data, dataset)
    pending = [sample for sample in samples if sample.forgotten_by_request_id is None]
    now = utcnow()
    request = DeletionRequest(
        model_id=model.id,
        subject_id=data.subject_id,
        reason=data.reason,
        method=method,
        config=config,
        state="processing" if pending else "completed",
        sample_count=len(samples),
        already_forgotten_count=len(samples) - len(pending),
        received_at=now,
        due_at=now + timedelta(days=settings.gdpr_due_days),
        completed_at=None if pending else now,
    )
    repository.add(session, request)
    forgotten_pks = {sample.id for sample in samples if sample.forgotten_by_request_id is not None}
    repository.add_samples(session, request.id, [sample.id for sample in samples], forgotten_pks)
    job = None
    if pending:
        job = Job(request_id=request.id, model_id=model.id, state="queued", method=method, config=config)
        jobs_repository.add(session, job)
    trail.append(
        session, "request.created", actor="api", subject_type="request", subject_id=request.id,
        request_id=request.id,
        data={"model": model.name, "method": method, "samples": len(samples),
              "already_erased": request.already_forgotten_count, "state": request.state,
              "due_at": request.due_at.isoformat(), "job_id": job.id if job else None},
    )  # fmt: skip
    if job is None:  # settled at once: every sample was already erased
        generate_report(session, request, "api")
    return CreatedRequest(request=request, model=model, job=job)


def _method_and_config(data: DeletionRequestCreate, dataset: Dataset) -> tuple[str, dict[str, object]]:
    method = data.method or (DEFAULT_METHOD if dataset.labelled else DEFAULT_LABEL_AGNOSTIC_METHOD)
    try:
        config = make_config(method, data.config)
    except ConfigError as exc:
        field = "method" if method not in METHODS else "config"
        raise InvalidInput("invalid-method-config", str(exc), field=field, method=method) from exc
    if METHODS[method].label_aware and not dataset.labelled:
        raise InvalidInput(
            "method-needs-labels",
            f"{method} uses labels but dataset {dataset.name!r} has none; use a label-agnostic method",
            field="method",
            method=method,
            label_agnostic_methods=sorted(name for name, info in METHODS.items() if not info.label_aware),
        )
    return method, config_to_dict(config)


def _named_samples(
    session: Session, settings: Settings, data: DeletionRequestCreate, dataset: Dataset
) -> list[Sample]:
    """The train samples the request names, checked: known, of this dataset, not audit, not repeated."""
    if (data.sample_ids is None) == (data.subject_id is None):
        raise InvalidInput("samples-or-subject", "give exactly one of sample_ids and subject_id")
    if data.subject_id is not None:
        subject_samples = datasets_repository.subject_samples(session, dataset.id, data.subject_id)
        train = [sample for sample in subject_samples if sample.split == "train"]
        if not train:
            raise InvalidInput(
                "unknown-subject",
                f"subject {data.subject_id!r} has no train samples in dataset {dataset.name!r}",
                field="subject_id",
                subject_id=data.subject_id,
            )
        _check_size(settings, len(train))
        return train
    sample_ids = data.sample_ids or []
    if not sample_ids:
        raise InvalidInput("empty-sample-ids", "sample_ids is empty", field="sample_ids")
    _check_size(settings, len(sample_ids))
    duplicates = sorted(sample_id for sample_id, count in Counter(sample_ids).items() if count > 1)
    if duplicates:
        raise listed_problem("duplicate-sample-ids", "sample ids are repeated", "sample_ids", duplicates)
    samples = datasets_repository.find_samples(session, dataset.id, sample_ids)
    found = {sample.sample_id for sample in samples}
    missing = [sample_id for sample_id in sample_ids if sample_id not in found]
    if missing:
        foreign = datasets_repository.sample_ids_in_other_datasets(session, dataset.id, missing)
        unknown = [sample_id for sample_id in missing if sample_id not in foreign]
        if unknown:
            raise listed_problem(
                "unknown-samples",
                f"sample ids are unknown to dataset {dataset.name!r}",
                "sample_ids",
                unknown,
            )
        raise listed_problem(
            "foreign-samples",
            f"sample ids belong to another dataset than the model's ({dataset.name!r})",
            "sample_ids",
            missing,
        )
    audit = [sample.sample_id for sample in samples if sample.split == "audit"]
    if audit:
        raise listed_problem(
            "audit-samples",
            "ids are audit samples: held out, the model never trained on them",
            "sample_ids",
            audit,
        )
    return samples


def _check_size(settings: Settings, count: int) -> None:
    if count > settings.max_samples_per_request:
        raise InvalidInput(
            "too-many-samples",
            f"{count} samples exceed the limit of {settings.max_samples_per_request} per request; split it",
            field="sample_ids",
            count=count,
            limit=settings.max_samples_per_request,
        )


def model_name(session: Session, request: DeletionRequest) -> str:
    model = models_repository.get_model(session, request.model_id)
    assert model is not None  # deletion_requests.model_id is a foreign key
    return model.name


def get_job(session: Session, request_id: str) -> Job | None:
    return jobs_repository.get_by_request(session, request_id)


def get_request(session: Session, request_id: str) -> DeletionRequest:
    request = repository.get(session, request_id)
    if request is None:
        raise NotFound(
            "deletion-request-not-found", f"no deletion request {request_id!r}", request_id=request_id
        )
    return request


def settle(
    session: Session, request_id: str, job_state: str, when: datetime, actor: str = "api"
) -> DeletionRequest:
    """Close the request with the outcome of its job (``jobs.service.finish`` calls this)."""
    request = get_request(session, request_id)
    request.state = REQUEST_STATE_FOR_JOB[job_state]
    request.completed_at = when
    session.flush()
    trail.append(
        session, "request.settled", actor=actor, subject_type="request", subject_id=request.id,
        request_id=request.id, data={"state": request.state, "completed_at": when.isoformat()},
    )  # fmt: skip
    generate_report(session, request, actor)
    return request
