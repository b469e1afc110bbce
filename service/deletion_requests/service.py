"""Deletion requests: validation and creation (with their job), and settling them when the job ends.

Never commits: the HTTP route commits the request and its job before dispatching; the worker commits settling
together with the job's final state.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from service.core.problems import NotFound
from service.deletion_requests import repository
from service.deletion_requests.tables import DeletionRequest

# Final request state for each terminal job state.
REQUEST_STATE_FOR_JOB = {
    "succeeded": "completed",
    "rejected": "rejected",
    "failed": "failed",
    "canceled": "canceled",
}


def get_request(session: Session, request_id: str) -> DeletionRequest:
    request = repository.get(session, request_id)
    if request is None:
        raise NotFound(
            "deletion-request-not-found", f"no deletion request {request_id!r}", request_id=request_id
        )
    return request


def settle(session: Session, request_id: str, job_state: str, when: datetime) -> DeletionRequest:
    """Close the request with the outcome of its job (``jobs.service.finish`` calls this)."""
    request = get_request(session, request_id)
    request.state = REQUEST_STATE_FOR_JOB[job_state]
    request.completed_at = when
    session.flush()
    return request
