from __future__ import annotations

from fastapi import APIRouter, status

from service.core.clock import utcnow
from service.dependencies import CursorQuery, LimitQuery, SessionDep, SettingsDep, page_size
from service.jobs import service
from service.jobs.schemas import JobOut, JobPage

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    model: str | None = None,
    state: str | None = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = None,
) -> JobPage:
    """Jobs newest first; filter by model name and state; page with the opaque ``next_cursor``."""
    page = service.list_jobs(
        session, model_name=model, state=state, cursor=cursor, limit=page_size(settings, limit)
    )
    now = utcnow()
    return JobPage(items=[JobOut.from_job(job, now) for job in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep) -> JobOut:
    return JobOut.from_job(service.get_job(session, job_id), utcnow())


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    """Queued: canceled at once. Running: ``cancel_requested``, the worker stops cooperatively. Done: 409."""
    job = service.request_cancel(session, job_id)
    session.commit()
    return JobOut.from_job(job, utcnow())
