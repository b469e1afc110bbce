from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Header, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.clients.security import requires
from service.clients.service import Principal
from service.deletion_requests import service
from service.deletion_requests.schemas import (
    AuditOutcome,
    DeletionRequestCreate,
    DeletionRequestOut,
    ErasureOut,
)
from service.deletion_requests.tables import DeletionRequest
from service.dependencies import DispatcherDep, SessionDep, SettingsDep
from service.dispatch import JobDispatcher
from service.erasures.service import Dispatch
from service.idempotency import service as idempotency
from service.idempotency.tables import IdempotencyRecord

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/deletion-requests", tags=["deletion requests"])


def request_out(session: Session, request: DeletionRequest) -> DeletionRequestOut:
    erasures = []
    for view in service.erasure_views(session, request):
        target = view.target
        erasures.append(
            ErasureOut(
                model=view.model_name,
                model_id=target.model_id,
                state=target.state,
                job_id=target.job_id,
                pending_count=target.pending_count,
                already_erased_count=target.already_erased_count,
                verdict=target.verdict,
                result_version=view.result_version,
                attempts=target.attempts,
                settled_at=target.settled_at,
                audit=AuditOutcome.from_metrics(view.job_metrics, request.id),
            )
        )
    scoped = next((e.model for e in erasures if e.model_id == request.model_id), None)
    return DeletionRequestOut(
        id=request.id,
        scope="model" if request.model_id else "dataset",
        model=scoped,
        model_id=request.model_id,
        dataset_id=request.dataset_id,
        origin_request_id=request.origin_request_id,
        state=request.state,
        subject_id=request.subject_id,
        reason=request.reason,
        method=request.method,
        config=request.config,
        sample_count=request.sample_count,
        received_at=request.received_at,
        due_at=request.due_at,
        completed_at=request.completed_at,
        erasures=erasures,
    )


def _replay(record: IdempotencyRecord) -> JSONResponse:
    return JSONResponse(
        record.body, status_code=record.status_code, headers={**record.headers, "Idempotent-Replayed": "true"}
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeletionRequestOut,
    responses={200: {"model": DeletionRequestOut, "description": "no model holds any of the samples"}},
)
def create_deletion_request(
    body: DeletionRequestCreate,
    caller: Annotated[Principal, requires("deletions:write")],
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Queue the erasure of the named samples from the model, or from every model of the dataset: 202,
    ``Location`` of the request (its ``erasures`` list each model's job), ``Retry-After``.

    Every check runs before anything is written. With an ``Idempotency-Key`` a retry of the same body replays
    the first answer (a different body with the same key is 422); keys are the calling client's own.
    """
    fingerprint = idempotency.fingerprint("POST", "/deletion-requests", body.model_dump(mode="json"))
    if idempotency_key is not None:
        record = idempotency.find_answer(session, caller.client_id, idempotency_key, fingerprint)
        if record is not None:
            return _replay(record)
    created = service.create_request(session, settings, body, caller)
    payload: dict[str, Any] = jsonable_encoder(request_out(session, created.request))
    pending = created.request.state == "processing"
    headers = (
        {
            "Location": f"/deletion-requests/{created.request.id}",
            "Retry-After": str(settings.retry_after_seconds),
        }
        if pending
        else {}
    )
    status_code = status.HTTP_202_ACCEPTED if pending else status.HTTP_200_OK
    try:
        if idempotency_key is not None:
            idempotency.remember_answer(
                session, caller.client_id, idempotency_key, fingerprint, status_code, payload, headers
            )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first (its row is seen when this one inserts or
        # commits): answer as it did.
        session.rollback()
        record = (
            idempotency.find_answer(session, caller.client_id, idempotency_key, fingerprint)
            if idempotency_key
            else None
        )
        if record is None:
            raise
        return _replay(record)
    dispatch_all(dispatcher, created.dispatches)
    return JSONResponse(payload, status_code=status_code, headers=headers)


def dispatch_all(dispatcher: JobDispatcher, dispatches: Sequence[Dispatch]) -> None:
    # The jobs are committed: if the queue is down they stay queued and the sweeper re-sends them.
    for dispatch in dispatches:
        try:
            dispatcher.dispatch(dispatch.job_id, delay_s=dispatch.delay_s)
        except Exception:
            logger.exception("dispatch of job %s failed; it stays queued for the sweeper", dispatch.job_id)


@router.get("/{request_id}", response_model=DeletionRequestOut)
def get_deletion_request(
    request_id: str, caller: Annotated[Principal, requires("deletions:read")], session: SessionDep
) -> DeletionRequestOut:
    return request_out(session, service.get_request(session, request_id, caller.tenant))
