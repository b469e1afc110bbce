from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from sqlalchemy import select

from service.clients.security import requires
from service.clients.service import Principal
from service.deletion_requests import service as requests_service
from service.dependencies import SessionDep
from service.trail import service
from service.trail.tables import TrailEvent

router = APIRouter(tags=["audit trail"])


@router.get("/audit-trail/verification")
def verify_trail(_caller: Annotated[Principal, requires("admin")], session: SessionDep) -> dict[str, Any]:
    """Recompute the whole chain (every tenant's events: one chain): ``valid``, how many events, and the first
    broken link (its ``seq``)."""
    return service.verify_chain(session).to_dict()


@router.get("/deletion-requests/{request_id}/trail")
def request_trail(
    request_id: str, caller: Annotated[Principal, requires("deletions:read")], session: SessionDep
) -> dict[str, Any]:
    """The request's events in order (who did what, when), each with its place in the chain."""
    requests_service.get_request(session, request_id, caller.tenant)
    events = session.scalars(
        select(TrailEvent).where(TrailEvent.request_id == request_id).order_by(TrailEvent.seq)
    ).all()
    return {
        "items": [
            {"seq": e.seq, "occurred_at": e.occurred_at.isoformat(), "actor": e.actor, "kind": e.kind,
             "subject_type": e.subject_type, "subject_id": e.subject_id, "data": e.data,
             "prev_hash": e.prev_hash, "hash": e.hash}
            for e in events
        ]
    }  # fmt: skip
