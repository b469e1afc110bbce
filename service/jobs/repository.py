"""Queries on jobs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.jobs.tables import ACTIVE_STATES, Job
from service.models.tables import Model


def add(session: Session, job: Job) -> None:
    session.add(job)
    session.flush()


def get(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def lock(session: Session, job_id: str) -> Job | None:
    """The job row, locked until commit and refreshed from the database."""
    return session.get(Job, job_id, with_for_update=True, populate_existing=True)


def active_job_id(session: Session, model_id: str, excluding: str) -> str | None:
    """A running or evaluating job of the model other than ``excluding``, if any."""
    return session.scalar(
        select(Job.id)
        .where(Job.model_id == model_id, Job.state.in_(ACTIVE_STATES), Job.id != excluding)
        .limit(1)
    )


def save_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    progress: dict[str, object],
    when: datetime,
    lease_expires_at: datetime,
) -> bool | None:
    """Store the progress of an active job held by ``worker_id`` and extend its lease; its cancel flag, or
    None when the job is not active or not that worker's."""
    return session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(ACTIVE_STATES), Job.worker_id == worker_id)
        .values(progress=progress, updated_at=when, lease_expires_at=lease_expires_at)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )


def list_jobs(
    session: Session,
    *,
    tenant: str,
    model_id: str | None,
    state: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> Sequence[Job]:
    """The tenant's jobs newest first, ties broken by id: a stable order for keyset pagination (``before`` =
    last key seen)."""
    query = (
        select(Job)
        .join(Model, Model.id == Job.model_id)
        .where(Model.tenant == tenant)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if model_id is not None:
        query = query.where(Job.model_id == model_id)
    if state is not None:
        query = query.where(Job.state == state)
    if before is not None:
        created_at, job_id = before
        query = query.where(
            or_(Job.created_at < created_at, (Job.created_at == created_at) & (Job.id < job_id))
        )
    return session.scalars(query).all()


def ready_ids(session: Session, now: datetime, limit: int = 20) -> list[str]:
    """Queued jobs that are ready, of models with no active job: earliest due date first, then oldest."""
    busy = select(Job.model_id).where(Job.state.in_(ACTIVE_STATES))
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.state == "queued",
                or_(Job.ready_at.is_(None), Job.ready_at <= now),
                Job.model_id.not_in(busy),
            )
            .order_by(Job.due_at.asc().nulls_last(), Job.created_at, Job.id)
            .limit(limit)
        )
    )


def ready_purge_ids(session: Session, model_id: str, now: datetime) -> list[str]:
    return list(
        session.scalars(
            select(Job.id).where(
                Job.model_id == model_id, Job.kind == "purge", Job.state == "queued",
                or_(Job.ready_at.is_(None), Job.ready_at <= now),
            )
        )
    )  # fmt: skip


def next_queued(session: Session, model_id: str) -> tuple[str, datetime | None] | None:
    """The model's queued job that comes first (earliest due date, then oldest), and when it is ready."""
    row = session.execute(
        select(Job.id, Job.ready_at)
        .where(Job.model_id == model_id, Job.state == "queued")
        .order_by(Job.due_at.asc().nulls_last(), Job.created_at, Job.id)
        .limit(1)
    ).first()
    return None if row is None else (row.id, row.ready_at)


def stale_queued_ids(session: Session, older_than: datetime) -> list[str]:
    """Queued jobs that have been ready since before ``older_than``."""
    ready_since = func.coalesce(Job.ready_at, Job.created_at)
    return list(
        session.scalars(
            select(Job.id).where(Job.state == "queued", ready_since < older_than).order_by(Job.created_at)
        )
    )


def abandoned_ids(session: Session, now: datetime) -> list[str]:
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.state.in_(ACTIVE_STATES), Job.lease_expires_at < now)
            .order_by(Job.created_at)
        )
    )


def unfinished_of_kind(session: Session, model_id: str, kind: str) -> Job | None:
    """The oldest queued, running or evaluating job of ``kind`` on the model, if any."""
    return session.scalar(
        select(Job)
        .where(Job.model_id == model_id, Job.kind == kind, Job.state.in_({"queued", *ACTIVE_STATES}))
        .order_by(Job.created_at)
        .limit(1)
    )
