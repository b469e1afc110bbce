from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, status
from sqlalchemy.orm import Session

from service.clients.security import requires
from service.clients.service import Principal
from service.core.clock import utcnow
from service.core.fields import Identifier
from service.core.pagination import TimeCursorQuery
from service.dependencies import LimitQuery, SessionDep, SettingsDep, page_size
from service.jobs import service
from service.jobs.schemas import JobOut, JobPage
from service.jobs.tables import Job, JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])


def jobs_out(session: Session, jobs: Sequence[Job]) -> list[JobOut]:
    now = utcnow()
    request_ids = service.request_ids(session, [job.id for job in jobs])
    return [JobOut.from_job(job, now, request_ids.get(job.id, [])) for job in jobs]


@router.get("", response_model=JobPage)
def list_jobs(
    caller: Annotated[Principal, requires("jobs:read")],
    session: SessionDep,
    settings: SettingsDep,
    model: Identifier | None = None,
    state: JobState | None = None,
    cursor: TimeCursorQuery = None,
    limit: LimitQuery = None,
) -> JobPage:
    """The tenant's jobs newest first; filter by model name and state; page with ``next_cursor``."""
    page = service.list_jobs(
        session,
        tenant=caller.tenant,
        model_name=model,
        state=state,
        cursor=cursor,
        limit=page_size(settings, limit),
    )
    return JobPage(items=jobs_out(session, page.items), next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, caller: Annotated[Principal, requires("jobs:read")], session: SessionDep) -> JobOut:
    return jobs_out(session, [service.get_job(session, job_id, caller.tenant)])[0]


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def cancel_job(
    job_id: str, caller: Annotated[Principal, requires("jobs:write")], session: SessionDep
) -> JobOut:
    """Queued: canceled at once, and its requests settled (``progress``: ``settling``, ``settled`` of
    ``total``), each in bounded transactions; a cancel cut short is taken up again by calling it again.
    Running: ``cancel_requested``, the worker stops cooperatively. Done: 409."""
    job = service.request_cancel(session, job_id, caller.tenant, caller.actor)
    canceled = job.state == "canceled"
    session.commit()
    while canceled and service.settle_pending(session, job_id, caller.actor):
        session.commit()
        session.expunge_all()  # what each chunk loaded: the session stays the size of one chunk
    session.commit()
    return jobs_out(session, [service.get_job(session, job_id, caller.tenant)])[0]
