"""Generating a report's facts in the transaction that settles its request (worker or API). Torch-free and
key-free: the GPU workers generate reports but never hold the signing key."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.deletion_requests.tables import DeletionRequest
from service.reports import commitment
from service.reports.builder import build_content, canonical_bytes
from service.reports.tables import ErasureReport
from service.trail import service as trail


def generate(session: Session, request: DeletionRequest, actor: str) -> ErasureReport:
    """The settled request's report facts, with its trail segment up to its settling. Once per request."""
    existing = session.get(ErasureReport, request.id)
    if existing is not None:
        return existing
    # The salt is used for this report and discarded: kept, it would re-link the commitments to the ids.
    salt = commitment.new_salt()
    content = build_content(session, request, salt)
    content["trail"] = trail.request_segment(session, request.id)
    report = ErasureReport(
        request_id=request.id, facts=canonical_bytes(content).decode(), commitment_salt=None
    )
    session.add(report)
    session.flush()
    trail.append(
        session, "report.generated", actor=actor, subject_type="report", subject_id=request.id,
        request_id=request.id, data={"state": request.state},
    )  # fmt: skip
    return report
