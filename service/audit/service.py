"""Reference sets: requesting a build (a job of kind ``build_references``) and registering the result.
Never commits."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.audit import repository
from service.audit.tables import AuditReferenceSet
from service.core.problems import InvalidInput, NotFound
from service.core.settings import Settings
from service.jobs import repository as jobs_repository
from service.jobs.tables import Job
from service.models.tables import Model
from service.storage import StoredObject

BUILD_KIND = "build_references"
BUILD_METHOD = "audit-references"  # what a build job shows as its method
MAX_REFERENCES = 64


def check_reference_count(references: int) -> int:
    if references < 2 or references % 2 or references > MAX_REFERENCES:
        raise InvalidInput(
            "invalid-reference-count",
            f"references must be an even number from 2 to {MAX_REFERENCES}, got {references}",
            field="references",
        )
    return references


def request_build(
    session: Session, settings: Settings, model: Model, references: int | None
) -> tuple[Job, bool]:
    """A queued build of the model's reference set; an unfinished build is returned as it stands. The
    second value says whether the job is new (the caller commits, then dispatches it)."""
    pending = jobs_repository.unfinished_of_kind(session, model.id, BUILD_KIND)
    if pending is not None:
        return pending, False
    count = check_reference_count(references if references is not None else settings.audit_references)
    job = Job(
        kind=BUILD_KIND, model_id=model.id, state="queued", method=BUILD_METHOD,
        config={"references": count, "seed": settings.audit_reference_seed},
    )  # fmt: skip
    jobs_repository.add(session, job)
    return job, True


def current_set(session: Session, model_id: str) -> AuditReferenceSet | None:
    return repository.latest(session, model_id)


def get_current_set(session: Session, model: Model) -> AuditReferenceSet:
    found = repository.latest(session, model.id)
    if found is None:
        raise NotFound(
            "reference-set-not-found",
            f"model {model.name!r} has no audit reference set yet: its first deletion request builds one, "
            f"or POST /models/{model.name}/audit-references",
            model=model.name,
        )
    return found


def register_set(
    session: Session,
    *,
    model_id: str,
    dataset_id: str,
    job_id: str,
    stored: StoredObject,
    summary: dict[str, Any],
) -> AuditReferenceSet:
    reference_set = AuditReferenceSet(
        model_id=model_id, dataset_id=dataset_id, job_id=job_id, references=int(summary["references"]),
        checkpoint_sha256=stored.sha256, size=stored.size, storage_uri=stored.uri, summary=summary,
    )  # fmt: skip
    repository.add(session, reference_set)
    return reference_set
