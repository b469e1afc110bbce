from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Response, status

from service.audit import service
from service.audit.schemas import ReferenceBuildCreate, ReferenceSetOut
from service.clients.security import requires
from service.clients.service import Principal
from service.core.clock import utcnow
from service.dependencies import DispatcherDep, SessionDep, SettingsDep
from service.jobs.schemas import JobOut
from service.models import service as models_service

router = APIRouter(prefix="/models/{name}/audit-references", tags=["audit"])
logger = logging.getLogger(__name__)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def build_references(
    name: str,
    caller: Annotated[Principal, requires("models:write")],
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    response: Response,
    body: ReferenceBuildCreate | None = None,
) -> JobOut:
    """Queue a (re)build of the model's audit reference set; poll the job at ``Location``. A build already
    queued or running is answered as it stands. A model's first deletion request builds one without this."""
    model = models_service.get_model(session, name, caller.tenant)
    job, created = service.request_build(session, settings, model, body.references if body else None)
    session.commit()
    response.headers["Location"] = f"/jobs/{job.id}"
    response.headers["Retry-After"] = str(settings.retry_after_seconds)
    if created:
        try:
            dispatcher.dispatch(job.id)
        except Exception:
            logger.exception("dispatch of job %s failed; it stays queued for the sweeper", job.id)
    return JobOut.from_job(job, utcnow(), request_ids=[])


@router.get("", response_model=ReferenceSetOut)
def get_references(
    name: str, caller: Annotated[Principal, requires("models:read")], session: SessionDep
) -> ReferenceSetOut:
    """The reference set the model's audits use now (the newest built)."""
    model = models_service.get_model(session, name, caller.tenant)
    found = service.get_current_set(session, model)
    return ReferenceSetOut(
        id=found.id, model=model.name, references=found.references,
        checkpoint_sha256=found.checkpoint_sha256, size=found.size, summary=found.summary,
        job_id=found.job_id, created_at=found.created_at,
    )  # fmt: skip
