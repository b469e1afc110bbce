from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from service.deletion_requests import service
from service.deletion_requests.schemas import AuditOutcome, DeletionRequestCreate, DeletionRequestOut
from service.deletion_requests.tables import DeletionRequest
from service.dependencies import DispatcherDep, SessionDep, SettingsDep
from service.dispatch import JobDispatcher
from service.idempotency import service as idempotency
from service.idempotency.tables import IdempotencyRecord

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/deletion-requests", tags=["deletion requests"])


def _request_out(
    request: DeletionRequest, model_name: str, job_id: str | None, audit: AuditOutcome | None = None
) -> DeletionRequestOut:
    return DeletionRequestOut(
        id=request.id,
        model=model_name,
        model_id=request.model_id,
        state=request.state,
        subject_id=request.subject_id,
        reason=request.reason,
        method=request.method,
        config=request.config,
        sample_count=request.sample_count,
        already_forgotten_count=request.already_forgotten_count,
        received_at=request.received_at,
        due_at=request.due_at,
        completed_at=request.completed_at,
        job_id=job_id,
        audit=audit,
    )


def _replay(record: IdempotencyRecord) -> JSONResponse:
    return JSONResponse(
        record.body, status_code=record.status_code, headers={**record.headers, "Idempotent-Replayed": "true"}
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeletionRequestOut,
    responses={200: {"model": DeletionRequestOut, "description": "every sample was already forgotten"}},
)
def create_deletion_request(
    body: DeletionRequestCreate,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Queue the unlearning of the named samples: 202, ``Location`` of the job, ``Retry-After``.

    Every check runs before anything is written. With an ``Idempotency-Key`` a retry of the same body replays
    the first answer (a different body with the same key is 422).
    """
    fingerprint = idempotency.fingerprint("POST", "/deletion-requests", body.model_dump(mode="json"))
    if idempotency_key is not None:
        record = idempotency.find_answer(session, idempotency_key, fingerprint)
        if record is not None:
            return _replay(record)
    created = service.create_request(session, settings, body)
    job_id = created.job.id if created.job is not None else None
    payload: dict[str, Any] = jsonable_encoder(_request_out(created.request, created.model.name, job_id))
    headers = (
        {"Location": f"/jobs/{job_id}", "Retry-After": str(settings.retry_after_seconds)} if job_id else {}
    )
    status_code = status.HTTP_202_ACCEPTED if job_id else status.HTTP_200_OK
    if idempotency_key is not None:
        idempotency.remember_answer(session, idempotency_key, fingerprint, status_code, payload, headers)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as it did.
        session.rollback()
        record = idempotency.find_answer(session, idempotency_key, fingerprint) if idempotency_key else None
        if record is None:
            raise
        return _replay(record)
    if job_id is not None:
        _dispatch(dispatcher, job_id)
    return JSONResponse(payload, status_code=status_code, headers=headers)


def _dispatch(dispatcher: JobDispatcher, job_id: str) -> None:
    # The job is committed: if the queue is down it stays queued and the sweeper re-sends it.
    try:
        dispatcher.dispatch(job_id)
    except Exception:
        logger.exception("dispatch of job %s failed; it stays queued for the sweeper", job_id)


@router.get("/{request_id}", response_model=DeletionRequestOut)
def get_deletion_request(request_id: str, session: SessionDep) -> DeletionRequestOut:
    request = service.get_request(session, request_id)
    job = service.get_job(session, request_id)
    audit = AuditOutcome.from_metrics(job.metrics) if job is not None else None
    return _request_out(request, service.model_name(session, request), job.id if job else None, audit)
