"""Queries on erasure targets and erased samples. Lookups by sample are chunked (SQLite caps parameters)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import and_, bindparam, case, func, insert, select, update
from sqlalchemy.orm import Session

from service.core.database import among
from service.datasets.tables import Sample
from service.deletion_requests.tables import DeletionRequestSample
from service.erasures.tables import ErasedSample, ErasureTarget
from service.jobs.tables import Job
from service.models.tables import Model

_CHUNK = 5_000


def add_target(session: Session, target: ErasureTarget) -> None:
    session.add(target)
    session.flush()


def targets_of_request(session: Session, request_id: str) -> Sequence[ErasureTarget]:
    return targets_of_requests(session, [request_id])[request_id]


def targets_of_requests(session: Session, request_ids: Sequence[str]) -> dict[str, list[ErasureTarget]]:
    """Each request's targets, oldest first, in one query."""
    found: dict[str, list[ErasureTarget]] = {request_id: [] for request_id in request_ids}
    query = select(ErasureTarget).where(ErasureTarget.request_id.in_(request_ids))
    for target in session.scalars(query.order_by(ErasureTarget.created_at)):
        found[target.request_id].append(target)
    return found


def targets_of_job(session: Session, job_id: str, *, lock: bool = False) -> Sequence[ErasureTarget]:
    query = select(ErasureTarget).where(ErasureTarget.job_id == job_id).order_by(ErasureTarget.due_at)
    return session.scalars(query.with_for_update() if lock else query).all()


def count_targets_of_jobs(session: Session, job_ids: Sequence[str]) -> dict[str, int]:
    rows = session.execute(
        select(ErasureTarget.job_id, func.count())
        .where(ErasureTarget.job_id.in_(job_ids))
        .group_by(ErasureTarget.job_id)
    )
    return {job_id: 0 for job_id in job_ids} | {str(job_id): int(count) for job_id, count in rows}


def request_ids_of_jobs(session: Session, job_ids: Sequence[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    rows = session.execute(
        select(ErasureTarget.job_id, ErasureTarget.request_id)
        .where(ErasureTarget.job_id.in_(job_ids))
        .order_by(ErasureTarget.due_at, ErasureTarget.request_id)
    )
    for job_id, request_id in rows:
        found.setdefault(str(job_id), []).append(request_id)
    return found


def models_of_dataset(session: Session, dataset_id: str) -> Sequence[Model]:
    return session.scalars(select(Model).where(Model.dataset_id == dataset_id).order_by(Model.name)).all()


def erased_pks(session: Session, model_id: str, sample_pks: Sequence[int]) -> set[int]:
    """Which of ``sample_pks`` the model's active lineage no longer holds."""
    found: set[int] = set()
    for start in range(0, len(sample_pks), _CHUNK):
        chunk = sample_pks[start : start + _CHUNK]
        found.update(
            session.scalars(
                select(ErasedSample.sample_pk).where(
                    ErasedSample.model_id == model_id, among(session, ErasedSample.sample_pk, chunk)
                )
            )
        )
    return found


def all_erased_pks(session: Session, model_id: str) -> set[int]:
    return set(session.scalars(select(ErasedSample.sample_pk).where(ErasedSample.model_id == model_id)))


def add_erased(
    session: Session,
    model_id: str,
    sample_pks: Iterable[int],
    version_id: str,
    request_id: str | None,
    when: datetime,
) -> int:
    """Record samples as erased from the model since ``version_id``, except those already recorded (the
    first erasure keeps the credit); returns how many were new."""
    wanted = sorted(set(sample_pks))
    new = [pk for pk in wanted if pk not in erased_pks(session, model_id, wanted)]
    if new:
        session.execute(
            insert(ErasedSample),
            [{"model_id": model_id, "sample_pk": pk, "version_id": version_id, "request_id": request_id,
              "erased_at": when} for pk in new],
        )  # fmt: skip
    return len(new)


def pending_samples(session: Session, request_ids: Sequence[str], model_id: str) -> dict[str, list[str]]:
    """Per request: the external ids of its samples the model still holds, by row."""
    erased = select(ErasedSample.sample_pk).where(
        ErasedSample.model_id == model_id, ErasedSample.sample_pk == Sample.id
    )
    rows = session.execute(
        select(DeletionRequestSample.request_id, Sample.sample_id)
        .join(Sample, Sample.id == DeletionRequestSample.sample_pk)
        .where(DeletionRequestSample.request_id.in_(request_ids), ~erased.exists())
        .order_by(Sample.row)
    )
    found: dict[str, list[str]] = {request_id: [] for request_id in request_ids}
    for request_id, sample_id in rows:
        found[request_id].append(sample_id)
    return found


def erased_counts_by_version(session: Session, model_id: str) -> dict[str, int]:
    rows = session.execute(
        select(ErasedSample.version_id, func.count())
        .where(ErasedSample.model_id == model_id)
        .group_by(ErasedSample.version_id)
    )
    return {version_id: int(count) for version_id, count in rows}


def erasures_of_samples(session: Session, sample_pks: Sequence[int]) -> dict[int, list[ErasedSample]]:
    found: dict[int, list[ErasedSample]] = {}
    for start in range(0, len(sample_pks), _CHUNK):
        chunk = sample_pks[start : start + _CHUNK]
        for row in session.scalars(select(ErasedSample).where(ErasedSample.sample_pk.in_(chunk))):
            found.setdefault(row.sample_pk, []).append(row)
    return found


def erased_from_every_model(session: Session, dataset_id: str, model_count: int) -> int:
    """How many of the dataset's samples every one of its ``model_count`` models has erased."""
    if model_count == 0:
        return 0
    per_sample = (
        select(ErasedSample.sample_pk)
        .join(Sample, Sample.id == ErasedSample.sample_pk)
        .where(Sample.dataset_id == dataset_id)
        .group_by(ErasedSample.sample_pk)
        .having(func.count() == model_count)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(per_sample)) or 0)


# A job that still takes requests: queued (not claimed, canceled or failed) and open (not sealed).
_TAKES_REQUESTS = and_(Job.state == "queued", Job.batch_open.is_(True))
# Every new erasure target's query: built once (the statements and their cache keys).
_OPEN_BATCHES = (
    select(Job)
    .where(_TAKES_REQUESTS, Job.model_id == bindparam("model_id"), Job.method == bindparam("method"))
    .order_by(Job.created_at)
)
_OPEN_BATCHES_LOCKED = _OPEN_BATCHES.with_for_update()
# Jobs read without a lock, locked: what the unlocked read loaded is refreshed (nothing was changed on them).
_LOCK_OPEN_BATCHES = (
    select(Job)
    .where(_TAKES_REQUESTS, Job.id.in_(bindparam("job_ids", expanding=True)))
    .order_by(Job.created_at)
    .with_for_update()
    .execution_options(populate_existing=True)
)


def open_batches(session: Session, model_id: str, method: str, *, lock: bool = True) -> Sequence[Job]:
    """The model's queued jobs that still take requests of ``method``, oldest first, locked (or not)."""
    statement = _OPEN_BATCHES_LOCKED if lock else _OPEN_BATCHES
    return session.scalars(statement, {"model_id": model_id, "method": method}).all()


def lock_open_batches(session: Session, job_ids: Sequence[str]) -> Sequence[Job]:
    """Those of ``job_ids`` that still take requests once locked, oldest first."""
    return session.scalars(_LOCK_OPEN_BATCHES, {"job_ids": list(job_ids)}).all()


# Joining an open job read without its lock (a request on one model): built once.
JOIN_OPEN_JOB = (
    update(Job)
    .where(
        _TAKES_REQUESTS,
        Job.id == bindparam("job_id"),
        Job.sample_count + bindparam("samples") < bindparam("limit"),
    )
    .values(
        sample_count=Job.sample_count + bindparam("samples"),
        due_at=case(
            (
                Job.due_at.is_(None) | (Job.due_at > bindparam("due_at", type_=Job.__table__.c.due_at.type)),
                bindparam("due_at", type_=Job.__table__.c.due_at.type),
            ),
            else_=Job.due_at,
        ),
        updated_at=bindparam("now", type_=Job.__table__.c.updated_at.type),
    )
    .returning(Job.id)
)
"""An open job takes ``samples`` more, its due date the earlier of its own and ``due_at``: matches (and
returns) its row only while it is queued, open, and stays under ``limit`` samples."""
