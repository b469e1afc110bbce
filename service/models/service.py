"""Model registry: models, the lineage of their versions, checkpoint import. Never commits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.core.problems import Conflict, NotFound
from service.models import repository
from service.models.tables import Model, ModelVersion
from service.storage import StoredObject


class VersionConflict(Conflict):
    """The version a job started from is no longer the active one: its result must not be activated."""


def get_model(session: Session, name: str) -> Model:
    model = repository.get_model_by_name(session, name)
    if model is None:
        raise NotFound("model-not-found", f"no model named {name!r}", model=name)
    return model


def get_version(session: Session, name: str, number: int) -> ModelVersion:
    model = get_model(session, name)
    version = repository.get_version_by_number(session, model.id, number)
    if version is None:
        raise NotFound(
            "version-not-found", f"model {name!r} has no version {number}", model=name, number=number
        )
    return version


def register_version(
    session: Session,
    *,
    model_id: str,
    parent_version_id: str | None,
    stored: StoredObject,
    method: str | None,
    config: dict[str, Any] | None,
    metrics_before: dict[str, Any] | None,
    metrics_after: dict[str, Any] | None,
    activate: bool,
    rejection_reason: str | None,
    job_id: str | None,
    request_ids: Sequence[str],
) -> ModelVersion:
    """Add the next version of ``model_id`` derived from ``parent_version_id``.

    Status: ``active`` when ``activate`` (the parent must still be the active version, else
    :class:`VersionConflict`; the parent becomes ``superseded``), ``rejected`` when a ``rejection_reason``
    is given, ``candidate`` otherwise. Holds the model's row lock until the caller commits, so version
    numbers and the single active version stay consistent under concurrent jobs.
    """
    if activate and rejection_reason is not None:
        raise ValueError("a rejected version cannot be activated")
    if repository.lock_model(session, model_id) is None:
        raise NotFound("model-not-found", f"no model {model_id!r}", model_id=model_id)
    parent = repository.get_version(session, parent_version_id) if parent_version_id is not None else None
    if parent_version_id is not None and (parent is None or parent.model_id != model_id):
        raise NotFound("version-not-found", f"model {model_id!r} has no version {parent_version_id!r}")
    if activate:
        current = repository.active_version(session, model_id)
        if parent is None or current is None or current.id != parent.id:
            raise VersionConflict(
                "stale-parent-version",
                f"version {parent_version_id!r} is no longer the active version of model {model_id!r}",
                active_version_id=current.id if current else None,
            )
        parent.status = "superseded"
        # Flushed first: the partial unique index allows one active version at any instant.
        session.flush()
    version = ModelVersion(
        model_id=model_id,
        number=repository.next_version_number(session, model_id),
        parent_id=parent_version_id,
        checkpoint_sha256=stored.sha256,
        checkpoint_size=stored.size,
        storage_uri=stored.uri,
        method=method,
        config=config,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        status="active" if activate else ("rejected" if rejection_reason is not None else "candidate"),
        rejection_reason=rejection_reason,
        created_by_job_id=job_id,
    )
    repository.add(session, version)
    repository.add_covered_requests(session, version.id, request_ids)
    return version
