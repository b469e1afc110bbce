"""Generating a report's facts in the transaction that settles its request (worker or API). Torch-free and
key-free: the GPU workers generate reports but never hold the signing key."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.deletion_requests.tables import DeletionRequest
from service.reports import commitment
from service.reports.builder import Rows, build_content, canonical_bytes
from service.reports.tables import ErasureReport
from service.trail import service as trail


def generate(session: Session, request: DeletionRequest, actor: str) -> ErasureReport:
    """The settled request's report facts, with its trail segment up to its settling. Once per request."""
    return generate_many(session, [request], actor)[0]


def generate_many(session: Session, requests: Sequence[DeletionRequest], actor: str) -> list[ErasureReport]:
    """:func:`generate` for each of many settled requests (a canceled job's chunk), in a few statements
    whatever their number: the rows they read, their trail segments and the reports written together."""
    if not requests:
        return []
    ids = [request.id for request in requests]
    existing = {
        report.request_id: report
        for report in session.scalars(select(ErasureReport).where(ErasureReport.request_id.in_(ids)))
    }
    new = [request for request in requests if request.id not in existing]
    if new:
        rows = Rows.load(session, [request.id for request in new])
        # The salt is used for one report and discarded: kept, it would re-link the commitments to the ids.
        contents = [build_content(session, request, commitment.new_salt(), rows) for request in new]
        segments = trail.request_segments(session, [request.id for request in new])
        for request, content in zip(new, contents, strict=True):
            content["trail"] = segments[request.id]
            existing[request.id] = ErasureReport(
                request_id=request.id, facts=canonical_bytes(content).decode(), commitment_salt=None
            )
        session.add_all([existing[request.id] for request in new])
        session.flush()
        for request in new:
            trail.append(
                session, "report.generated", actor=actor, subject_type="report", subject_id=request.id,
                request_id=request.id, data={"state": request.state},
            )  # fmt: skip
    return [existing[request_id] for request_id in ids]
