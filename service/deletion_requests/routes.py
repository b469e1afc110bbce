from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, status
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.clients.security import requires
from service.clients.service import Principal
from service.core.database import PreconditionFailed, among
from service.core.problems import InvalidInput, ProblemError, problem_body
from service.core.settings import Settings
from service.deletion_requests import service
from service.deletion_requests.schemas import (
    AuditOutcome,
    BulkCreate,
    BulkItem,
    BulkOut,
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
from service.purges import service as purges

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/deletion-requests", tags=["deletion requests"])


def request_out(
    session: Session, request: DeletionRequest, views: Sequence[service.ErasureView] | None = None
) -> DeletionRequestOut:
    """The request as answered; ``views``: its erasures when in hand (a request just created), else read."""
    erasures = []
    for view in service.erasure_views(session, request) if views is None else views:
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
                purge=purges.purge_view(session, target),
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
    request = _Create(session, settings, dispatcher, body, caller, idempotency_key, fingerprint)
    try:
        return request.run(optimistic=True)
    except PreconditionFailed:
        # The open job it joined unlocked was claimed, sealed or filled before the commit, which wrote
        # nothing: once more, under the job's lock.
        session.rollback()
        return request.run(optimistic=False)


@dataclass(frozen=True)
class _Create:
    """One ``POST /deletion-requests``: created, answered and committed (:meth:`run`)."""

    session: Session
    settings: Settings
    dispatcher: JobDispatcher
    body: DeletionRequestCreate
    caller: Principal
    idempotency_key: str | None
    fingerprint: str

    def run(self, *, optimistic: bool) -> JSONResponse:
        session, settings, caller, key = self.session, self.settings, self.caller, self.idempotency_key
        # The key is not read before the work: its record's primary key refuses a second answer (below). A
        # retry of an answered request does the work again, is refused there, rolls back and replays.
        try:
            created = service.create_request(session, settings, self.body, caller, optimistic=optimistic)
        except ProblemError:
            # Refused now, but answered before (its samples since erased, say): the first answer stands.
            record = self._answered()
            if record is None:
                raise
            return _replay(record)
        payload: dict[str, Any] = request_out(session, created.request, created.erasures).model_dump(
            mode="json"
        )
        pending = created.request.state == "processing"
        headers = _headers(settings, created.request)
        status_code = status.HTTP_202_ACCEPTED if pending else status.HTTP_200_OK
        try:
            if key is not None:
                idempotency.remember_answer(
                    session, caller.client_id, key, self.fingerprint, status_code, payload, headers
                )
            session.commit()
        except IntegrityError:
            # A concurrent request with the same key committed first (its row is seen when this one inserts
            # or commits): answer as it did.
            session.rollback()
            record = self._answered()
            if record is None:
                raise
            return _replay(record)
        dispatch_all(self.dispatcher, created.dispatches)
        return JSONResponse(payload, status_code=status_code, headers=headers)

    def _answered(self) -> IdempotencyRecord | None:
        if self.idempotency_key is None:
            return None
        return idempotency.find_answer(
            self.session, self.caller.client_id, self.idempotency_key, self.fingerprint
        )


@router.post("/bulk", response_model=BulkOut)
def create_deletion_requests_in_bulk(
    body: BulkCreate,
    caller: Annotated[Principal, requires("deletions:write")],
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
) -> JSONResponse:
    """Many deletion requests in one call (a backlog of erasure tickets): each item is its own request, with
    its own due date and ``idempotency_key``, validated as a single POST would be. Answered 200 with one
    outcome per item, in order: the request (``status`` 202 or 200), or the problem that refused it; the
    accepted items are committed together, the refused ones wrote nothing. At most 1,000 items a call."""
    for attempt in range(2):
        outcomes, dispatches = _bulk_items(session, settings, body.items, caller)
        try:
            session.commit()
            break
        except IntegrityError:
            # A concurrent call answered one of the keys meanwhile: once more, that item now replays it.
            session.rollback()
            if attempt:
                raise
    dispatch_all(dispatcher, list({d.job_id: d for d in dispatches}.values()))
    accepted = sum(1 for item in outcomes if "request" in item)
    # The items are the answers as stored for their keys, already JSON: sent as they are (BulkOut documents
    # them; validating 1,000 nested answers again would cost as much as writing them).
    return JSONResponse({"accepted": accepted, "refused": len(outcomes) - accepted, "items": outcomes})


def _bulk_items(
    session: Session, settings: Settings, items: Sequence[BulkItem], caller: Principal
) -> tuple[list[dict[str, Any]], list[Dispatch]]:
    """Each item checked as a single POST would be (replayed, refused, or prepared), then the prepared ones
    written together, with their idempotency records. Returns each item's outcome (a ``BulkItemOut``)."""
    outcomes: dict[int, dict[str, Any]] = {}
    prepared: list[tuple[int, str | None, str, service.PreparedRequest]] = []
    keys = [item.idempotency_key for item in items if item.idempotency_key is not None]
    # The call's answered keys read in one query; held here, find_answer finds them in the session.
    held = session.scalars(
        select(IdempotencyRecord).where(
            IdempotencyRecord.client_id == caller.client_id, among(session, IdempotencyRecord.key, keys)
        )
    ).all()
    answered = {record.key for record in held}
    seen: set[str] = set()
    requests = [
        DeletionRequestCreate.model_validate(item.model_dump(exclude={"idempotency_key"})) for item in items
    ]
    lookups = service.Lookups()
    lookups.preload(session, settings, requests, caller.tenant)
    for index, (item, data) in enumerate(zip(items, requests, strict=True)):
        key = item.idempotency_key
        fingerprint = idempotency.fingerprint("POST", "/deletion-requests", data.model_dump(mode="json"))
        try:
            if key is not None and key in seen:
                raise InvalidInput("duplicate-idempotency-key", "an earlier item of this call has this key",
                                   field="idempotency_key", idempotency_key=key)  # fmt: skip
            record = (
                idempotency.find_answer(session, caller.client_id, key, fingerprint)
                if key is not None and key in answered
                else None
            )
            if record is not None:
                outcomes[index] = {"index": index, "status": record.status_code, "replayed": True,
                                   "request": record.body}  # fmt: skip
                continue
            prepared.append(
                (index, key, fingerprint, service.prepare_request(session, settings, data, caller, lookups))
            )
        except ProblemError as problem:
            body = problem_body(problem.status, problem.slug, problem.detail, **problem.extensions)
            outcomes[index] = {"index": index, "status": problem.status, "replayed": False, "problem": body}
        finally:
            if key is not None:
                seen.add(key)
    created, dispatches = service.create_requests(
        session, settings, [request for *_, request in prepared], caller.actor
    )
    for (index, key, fingerprint, _request), made in zip(prepared, created, strict=True):
        answer = request_out(session, made.request, made.erasures).model_dump(mode="json")
        status_code = status.HTTP_202_ACCEPTED if made.request.state == "processing" else status.HTTP_200_OK
        if key is not None:
            idempotency.remember_answer(
                session,
                caller.client_id,
                key,
                fingerprint,
                status_code,
                answer,
                _headers(settings, made.request),
            )
        outcomes[index] = {"index": index, "status": status_code, "replayed": False, "request": answer}
    return [outcomes[index] for index in range(len(items))], dispatches


def _headers(settings: Settings, request: DeletionRequest) -> dict[str, str]:
    if request.state != "processing":
        return {}
    return {"Location": f"/deletion-requests/{request.id}", "Retry-After": str(settings.retry_after_seconds)}


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
